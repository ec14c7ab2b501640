"""Loading a local Hugging Face checkpoint directory into a HookedTransformer, fully offline.

Private to :mod:`rh_lens.models`.  TransformerLens 3.x's ``from_pretrained`` refuses names that
are not on its official list and guesses the architecture from substrings of the name ("llama",
"gemma"), so a directory is read here through its own ``config.json``: the config is converted
by TransformerLens under a neutrally named alias of the directory, the rotary settings are
checked against the checkpoint (TL maps only llama3-style scaling; linear scaling would load as
unscaled without a word), and the weights go through TL's own per-architecture converters.
"""

import contextlib
import json
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens._loading import SUPPORTED_ARCHITECTURES, build_model, quiet_loading, require_rotary
from rh_lens.errors import ModelLoadError

TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


def load(
    path: Path, config: dict, *, device: torch.device, dtype: torch.dtype, n_ctx: int | None
) -> HookedTransformer:
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    architecture = (config.get("architectures") or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {architecture!r} is not supported; rh_lens loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    _require_files(path)
    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    trained_ctx = _trained_context(hf_config)
    with quiet_loading(), _neutral_alias(path, _legacy_fields(config)) as alias:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        cfg = loading.get_pretrained_model_config(
            str(alias),
            hf_cfg=hf_config.to_dict(),
            device=device,
            dtype=dtype,
            fold_ln=False,
            local_files_only=True,
        )
        if n_ctx is not None:
            require_rotary(cfg.positional_embedding_type, trained_ctx or cfg.n_ctx, n_ctx, path)
            cfg.n_ctx = n_ctx
        _check_rotary(cfg, hf_config, path)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype
        )
        state_dict = loading.get_pretrained_state_dict(
            str(alias), cfg, hf_model=hf_model, dtype=dtype
        )
        del hf_model
    cfg.model_name = path.resolve().name
    return build_model(cfg, state_dict, tokenizer)


def _require_files(path: Path) -> None:
    if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").is_file():
        raise ModelLoadError(f"{path} has no weights (*.safetensors or pytorch_model.bin)")
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        names = " or ".join("+".join(group) for group in TOKENIZER_FILES)
        raise ModelLoadError(f"{path} has no tokenizer: expected {names}")


def _trained_context(hf_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


def _rope_settings(hf_config) -> tuple[float | None, dict | None]:
    """``(rope_theta, scaling)`` from either the transformers 4 or the 5 layout."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = getattr(hf_config, "rope_theta", None) or params.get("rope_theta")
    scaling = getattr(hf_config, "rope_scaling", None) or params
    kind = (scaling.get("rope_type") or scaling.get("type") or "default") if scaling else "default"
    return theta, (None if kind == "default" else {**scaling, "rope_type": kind})


def _check_rotary(cfg: HookedTransformerConfig, hf_config, path: Path) -> None:
    """Make the converted config's rotary embedding equal the checkpoint's, or refuse."""
    if cfg.positional_embedding_type != "rotary":
        return
    theta, scaling = _rope_settings(hf_config)
    if theta is not None and float(cfg.rotary_base) != float(theta):
        raise ModelLoadError(
            f"{path}: TransformerLens read rotary base {cfg.rotary_base}, the checkpoint says "
            f"{theta}; refusing to compute attention with the wrong positions"
        )
    if scaling is None:
        return
    kind, factor = scaling["rope_type"], float(scaling.get("factor", 1.0))
    if kind == "llama3" and cfg.use_NTK_by_parts_rope:
        return
    if kind == "yarn" and getattr(cfg, "use_yarn_rope", False):
        return
    if kind == "linear":
        # Linear scaling divides every frequency by `factor`.  TL's NTK-by-parts branch does
        # exactly that when every wavelength counts as "low frequency": with an original
        # context of 1 token, every wavelength (>= 2*pi) exceeds 1 / low_freq_factor.
        cfg.use_NTK_by_parts_rope = True
        cfg.NTK_original_ctx_len = 1
        cfg.NTK_by_parts_low_freq_factor = 1.0
        cfg.NTK_by_parts_high_freq_factor = 2.0
        cfg.NTK_by_parts_factor = factor
        return
    raise ModelLoadError(
        f"{path}: rope scaling {scaling!r} is not reproduced by TransformerLens 3.x; "
        "rh_lens refuses to load it rather than compute attention with the wrong positions"
    )


def _legacy_fields(config: dict) -> dict:
    """Config keys TL 3.x still reads but transformers 5 no longer writes (GPT-2's ``n_ctx``)."""
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        return {"n_ctx": config.get("n_positions", 1024)}
    return {}


@contextlib.contextmanager
def _neutral_alias(path: Path, config_patch: dict):
    """A directory named ``checkpoint`` whose files link to ``path``'s.

    TL picks architectures by substrings of names, so the name must be neutral; ``config.json``
    is a copy with ``config_patch`` applied.
    """
    with tempfile.TemporaryDirectory(prefix="rh_lens_") as tmp:
        alias = Path(tmp) / "checkpoint"
        alias.mkdir()
        for item in path.resolve().iterdir():
            if item.name != "config.json":
                (alias / item.name).symlink_to(item)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        (alias / "config.json").write_text(json.dumps({**config, **config_patch}))
        yield alias
