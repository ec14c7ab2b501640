"""The embedded model zoo: small HookedTransformers with genuine retrieval heads, trained by the
project on its own generated data, shipped in ``rh_lens/zoo/models/`` and loaded with
``rh_lens.load_model("zoo:NAME")``.

Modules: :mod:`~rh_lens.zoo.prose` (seeded prose), :mod:`~rh_lens.zoo.tasks` (NIAH, multi-hop CoT,
parametric facts, chat format), :mod:`~rh_lens.zoo.tokenizer` (byte-level BPE),
:mod:`~rh_lens.zoo.twin` (the plain-PyTorch training twin), :mod:`~rh_lens.zoo.recipes`,
:mod:`~rh_lens.zoo.data`, :mod:`~rh_lens.zoo.train` and :mod:`~rh_lens.zoo.evaluate`
(``python -m rh_lens.zoo.train NAME`` / ``python -m rh_lens.zoo.evaluate NAME``).
Nothing is imported here, so ``import rh_lens.zoo`` stays cheap.
"""
