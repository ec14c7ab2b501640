"""Training the zoo: recipes, batches, tokenizer builder, the plain-PyTorch twin, the trainer, the
evaluation that writes each model card, and the training benchmark.

    python -m rh_lens.zoo.training.train NAME --install   # train, evaluate, copy into the package
    python -m rh_lens.zoo.training.evaluate NAME          # held-out figures, compared with the card
    python -m rh_lens.zoo.training.bench                  # each recipe's training time

Modules: :mod:`~rh_lens.zoo.training.recipes` (every model's recipe, as data),
:mod:`~rh_lens.zoo.training.data` (batches, a pure function of recipe and step),
:mod:`~rh_lens.zoo.training.tokenizer` (byte-level BPE), :mod:`~rh_lens.zoo.training.twin`,
:mod:`~rh_lens.zoo.training.train`, :mod:`~rh_lens.zoo.training.evaluate` and
:mod:`~rh_lens.zoo.training.bench`.  Nothing outside this package imports it.
"""
