"""Shared fixtures: tiny models built in-process, never downloaded, never loaded at import time.

The backend matrix: ``backend`` runs a test once per engine that this transformer-lens has
(``hooked`` and ``bridge`` on 3.x, ``bridge`` alone on 4.x), and ``tiny_gqa`` is built once per
engine, so every test that takes it runs on both.

The markers (registered in pyproject.toml): ``slow`` (more than about 5 s; every notebook is
marked here), ``tl4`` (must also pass under transformer-lens 4.x, where CI runs ``pytest -m tl4``;
there only the test modules that mark some test ``tl4`` are collected, since the others need the
HookedTransformer and may not even import) and ``needs_shared`` (reads ``../shared``; skipped here,
with the reason, when it is absent).
"""

from pathlib import Path

import pytest
import torch

from rh_lens.models import HAS_HOOKED
from rh_lens.niah import Needle, TextHaystack

BACKENDS = ("hooked", "bridge") if HAS_HOOKED else ("bridge",)
SHARED = Path(__file__).resolve().parents[2] / "shared"

CORPUS = [
    "Once upon a time there was a girl named Mara who lived in Tolbrook by the sea.",
    "The secret ingredient of her soup was purple ginger and sea salt, she said.",
    "Numbers like 1, 22 and 333 appear too; so do questions? And (brackets)!",
    "Based on the content of the book, Question: What is the secret?\nAnswer:",
] * 25


_RUNNING = []  # the test item being set up or run, for shared_path's check of its marker


def shared_path(*parts: str) -> Path:
    """A path inside ``../shared`` for a test marked ``needs_shared``; the test is skipped when
    the path is absent."""
    if _RUNNING and not _RUNNING[0].get_closest_marker("needs_shared"):
        raise AssertionError(f"{_RUNNING[0].nodeid} reads ../shared: mark it needs_shared")
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Without the HookedTransformer (transformer-lens 4.x), collect only the test modules that
    mark some test ``tl4``: the others are not meant to run there and may not import."""
    if HAS_HOOKED or not (collection_path.name.startswith("test_")
                          and collection_path.suffix == ".py"):
        return None
    return "pytest.mark.tl4" not in collection_path.read_text(encoding="utf-8")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _RUNNING[:] = [item]
    if item.get_closest_marker("needs_shared") and not SHARED.is_dir():
        pytest.skip(f"needs_shared: {SHARED} is not available")


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in-process, wrapped for transformers/TransformerLens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", add_bos_token=True
    )
    tok.init_kwargs.setdefault("name_or_path", "")  # as after save/load; TL reads it
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


def save_hf_model(path: Path, arch: str, tokenizer, **overrides) -> Path:
    """Save a tiny random Hugging Face model of ``arch`` plus ``tokenizer`` to ``path``."""
    import transformers

    torch.manual_seed(0)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        classes = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }
        config_cls, model_cls = classes[arch]
        config = config_cls(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **{**common, **overrides},
        )
        model = model_cls(config)
    # Random init leaves tiny weights; scale them so attention is far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny checkpoints of several architectures; directory names contain the family name
    (TransformerLens 3.9 guesses architectures from such substrings)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        arch: save_hf_model(root / f"tiny-{arch}", arch, tokenizer)
        for arch in ("llama", "mistral", "qwen2", "gpt2")
    }


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=BACKENDS)
def tiny_gqa(request, tokenizer):
    return build_tiny_gqa(tokenizer, request.param)


def build_tiny_gqa(tokenizer, backend: str):
    """A random Llama-style model with grouped-query attention, on ``backend`` (the Bridge one
    is the HookedTransformer's weights as a Hugging Face Llama)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128,
        n_ctx=128, d_vocab=len(tokenizer), act_fn="silu", gated_mlp=True,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
        final_rms=True, seed=0, model_name="tiny-gqa", original_architecture="LlamaForCausalLM",
    )
    return scaled_on(HookedTransformer(cfg, tokenizer=tokenizer), backend, 4.0)


def scaled_on(model, backend: str, scale: float):
    """``model`` with its weight matrices scaled (peaked attention), in eval mode, on
    ``backend``."""
    from tests.known_answer import reload_on

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "W_" in name:
                p.mul_(scale)
    model.eval()
    return model if backend == "hooked" else reload_on(model, backend)


COPY_NEEDLE = Needle("The magic word is secret.", "What is the magic word?", "secret")
COPY_HAYSTACK = TextHaystack(" ".join([CORPUS[0], CORPUS[2]]))


@pytest.fixture(scope="session")
def copy_inputs(tmp_path_factory, tokenizer) -> Path:
    """A folder holding the known-answer copy model (``tests.known_answer``; head L0H1 copies
    the needle's answer) saved as the directory ``model``, :data:`COPY_NEEDLE` as
    ``needles.jsonl`` and :data:`COPY_HAYSTACK` as the haystack folder ``hay``.  Read only."""
    import json

    from rh_lens.models import save_model_dir
    from tests.known_answer import build_copy_model

    root = tmp_path_factory.mktemp("copy")
    (word_id,) = tokenizer.encode(" " + COPY_NEEDLE.answer, add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=1)
    save_model_dir(root / "model", cfg=model.cfg, state_dict=model.state_dict(),
                   tokenizer=tokenizer)
    (root / "needles.jsonl").write_text(json.dumps(
        {"needle": COPY_NEEDLE.needle, "question": COPY_NEEDLE.question,
         "real_needle": COPY_NEEDLE.answer}) + "\n")
    (root / "hay").mkdir()
    (root / "hay" / "a.txt").write_text(COPY_HAYSTACK.source)
    return root


HOOK_TEXT = "The secret ingredient of Mara's soup is purple ginger and sea salt."


@pytest.fixture(scope="module")
def clean(tiny_gqa):
    """``HOOK_TEXT``'s tokens and the full activation cache of ``tiny_gqa`` on them."""
    import torch

    from rh_lens.engine import tokenize

    tokens = tokenize(tiny_gqa, HOOK_TEXT)[None]
    with torch.no_grad():
        _, cache = tiny_gqa.run_with_cache(tokens)
    return tokens, cache


def attached_hooks(model) -> int:
    """Forward hooks attached anywhere in ``model`` (0 once every ``model.hooks`` has exited)."""
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())
