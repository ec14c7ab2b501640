"""Model loading: the one place in rh_lens that knows where models come from.

``load_model(spec)`` returns a ``HookedTransformer`` (``backend="hooked"``, the default with
transformer-lens 3.x) or a ``TransformerBridge`` around the Hugging Face model
(``backend="bridge"``, the default with 4.x, which has no HookedTransformer), with a working
tokenizer, from any of:

- ``zoo:NAME``: a model of the project's own zoo, shipped inside the package;
- ``llama2c:MODEL.bin`` or ``llama2c:MODEL.bin,TOKENIZER.bin``: a karpathy/llama2.c checkpoint;
- a local directory: a Hugging Face checkpoint (``config.json`` + safetensors + tokenizer files) or
  a directory written by :func:`save_model_dir`;
- a TransformerLens model name (``gpt2``, ``meta-llama/Llama-2-7b-hf``, ...), through
  ``HookedTransformer.from_pretrained`` where the weights are cached or the Hub is reachable;
  with ``revision`` (a branch, tag or commit: Pythia's ``step1000``), the Hugging Face snapshot
  of that revision, from the local cache or downloaded, loaded as a local directory.

Once loaded, the rest of the package reaches a model only through the narrow surface of
:mod:`rh_lens.engine` (model facts, tokenization without truncation, a forward of one chunk against
a key/value cache), re-exported here.  The loaders are private: :mod:`rh_lens._bridge`,
:mod:`rh_lens._hf_dir` and :mod:`rh_lens._llama2c`, over what they share in
:mod:`rh_lens._loading`.  Weights are never folded or centred: attention patterns do not
depend on that processing, logits then equal the original model's, and processing costs 7-9x the
model size in host memory.
"""

import dataclasses
import difflib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from rh_lens import _bridge
from rh_lens._loading import (
    HAS_HOOKED,
    HookedTransformer,
    HookedTransformerConfig,
    build_model,
    is_rebuilt_buffer,
    quiet_loading,
    require_rotary,
    store_for_linear,
)
from rh_lens.engine import (
    BACKENDS,
    DEFAULT_BACKEND,
    Backend,
    KVState,
    Model,
    ModelFacts,
    backend_of,
    check_context,
    forward_chunk,
    model_facts,
    new_kv_state,
    require_hooked,
    set_hook_flags,
    tokenize,
    tokenize_with_offsets,
    weights_fingerprint,
)
from rh_lens.errors import ContextTooLongError, ModelLoadError

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "HAS_HOOKED",
    "ContextTooLongError",
    "KVState",
    "ModelFacts",
    "Model",
    "ModelLoadError",
    "backend_of",
    "check_context",
    "forward_chunk",
    "load_model",
    "model_facts",
    "new_kv_state",
    "require_hooked",
    "set_hook_flags",
    "save_model_dir",
    "tokenize",
    "tokenize_with_offsets",
    "weights_fingerprint",
    "zoo_names",
]

FORMAT_VERSION = 1
ZOO_DIR = Path(__file__).resolve().parent / "zoo" / "models"

DTypeSpec = torch.dtype | str | None  # a name of DTYPES or a torch.dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# Loading


def zoo_names() -> list[str]:
    """Names of the bundled zoo models (``load_model("zoo:NAME")``)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def zoo_card(spec: str) -> dict | None:
    """The model card of the zoo model ``spec`` ("zoo:NAME"): None for any other spec."""
    if not spec.startswith("zoo:"):
        return None
    path = ZOO_DIR / spec.removeprefix("zoo:") / "card.json"
    if not path.is_file():
        raise ModelLoadError(f"unknown zoo model {spec!r}; available: "
                             f"{', '.join(zoo_names()) or 'none built yet'}")
    return _read_json(path)


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: DTypeSpec = None,
    n_ctx: int | None = None,
    backend: Backend = DEFAULT_BACKEND,
    fast_prefill: bool | None = None,
    revision: str | None = None,
) -> Model:
    """Load a model from a spec (see the module docstring) as an eval-mode model.

    ``device="auto"`` picks CUDA when present; the default is the CPU.  ``dtype`` defaults to
    float32.  ``n_ctx`` overrides the context window (extending a rotary model's position tables).
    ``backend`` picks the engine: ``"hooked"`` (HookedTransformer, transformer-lens 3.x only) or
    ``"bridge"`` (TransformerBridge around the Hugging Face model).  ``fast_prefill`` (Bridge
    only, on by default there) fills the key/value cache with Hugging Face's SDPA kernels
    whenever no hook is attached.  ``revision`` picks a revision of a Hugging Face model name
    (a training checkpoint of a series, say); other specs have none.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "hooked":
        require_hooked("backend='hooked'", alternative="use backend='bridge' or ")
    if backend == "hooked" and fast_prefill:
        raise ValueError("fast_prefill needs backend='bridge'")
    device = _resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if n_ctx is not None and n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive number of tokens, got {n_ctx}")
    how = _How(backend, fast_prefill)
    text = os.fspath(spec)
    if revision is not None:
        if text.startswith(("zoo:", "llama2c:")) or Path(text).expanduser().exists() \
                or _looks_like_path(text):
            raise ValueError(f"revision {revision!r} applies to Hugging Face model names only, "
                             f"not to {text!r}")
        model = _load_directory(_revision_snapshot(_official_name(text), revision), device,
                                torch_dtype, n_ctx, how)
    elif text.startswith("zoo:"):
        model = _load_zoo(text[4:], device, torch_dtype, n_ctx, how)
    elif text.startswith("llama2c:"):
        model = _load_llama2c(text[8:], device, torch_dtype, n_ctx, how)
    elif Path(text).expanduser().exists():
        model = _load_directory(Path(text).expanduser(), device, torch_dtype, n_ctx, how)
    elif _looks_like_path(text):
        raise ModelLoadError(f"model directory {text!r} does not exist")
    else:
        model = _load_named(text, device, torch_dtype, n_ctx, how)
    model.eval()
    _validate(model)
    if backend == "hooked":
        store_for_linear(model)
    return model


@dataclass(frozen=True)
class _How:
    backend: Backend
    fast_prefill: bool | None

    @property
    def bridge(self) -> bool:
        return self.backend == "bridge"


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "~", os.sep)) or text.endswith(os.sep) or os.sep * 2 in text


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, refused (naming what this machine has) when it is not there."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    ok = resolved is not None and (
        resolved.type == "cpu"
        or (resolved.type == "cuda" and (resolved.index or 0) < n_cuda)
        or (resolved.type == "mps" and has_mps))
    if not ok:
        available = ["cpu", *(["cuda"] + [f"cuda:{i}" for i in range(n_cuda)] if n_cuda else []),
                     *(["mps"] if has_mps else []), "auto"]
        why = ("no CUDA device is available on this machine" if resolved is not None
               and resolved.type == "cuda" and not n_cuda else "not a device on this machine")
        raise ModelLoadError(f"device {str(device)!r}: {why}; available: {', '.join(available)}")
    return resolved


def resolve_dtype(dtype: DTypeSpec) -> torch.dtype:
    """The torch dtype of a :data:`DTYPES` name (float32 for None); unknown names are refused."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _load_zoo(name: str, device, dtype, n_ctx, how: _How) -> Model:
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        available = ", ".join(zoo_names()) or "none built yet"
        raise ModelLoadError(f"unknown zoo model {name!r}; available: {available}")
    return _load_rh_lens_dir(path, device, dtype, n_ctx, how)


def _load_llama2c(rest: str, device, dtype, n_ctx, how: _How) -> Model:
    from rh_lens import _llama2c

    model_path, _, tok_path = rest.partition(",")
    if how.bridge and not HAS_HOOKED:
        raise ModelLoadError("llama2c checkpoints load through HookedTransformer "
                             "(transformer-lens 3.x); none is installed")
    model = _llama2c.load(
        Path(model_path).expanduser(),
        Path(tok_path).expanduser() if tok_path else None,
        n_ctx=n_ctx,
        device=device,
        dtype=dtype,
    )
    if not how.bridge:
        return model
    state_dict = {k: v for k, v in model.state_dict().items() if not is_rebuilt_buffer(k)}
    return _bridge.load_hooked_format(
        _config_to_json(model.cfg), state_dict, model.tokenizer, device=device, dtype=dtype,
        fast_prefill=how.fast_prefill, source=model_path,
    )


def _load_directory(path: Path, device, dtype, n_ctx, how: _How) -> Model:
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is a file, not a model directory; for a llama2.c checkpoint use "
            f"'llama2c:{path}'"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face or rh_lens model")
    config = _read_json(config_path)
    if "rh_lens_format" in config:
        return _load_rh_lens_dir(path, device, dtype, n_ctx, how)
    if how.bridge:
        return _bridge.load_hf_directory(path, device=device, dtype=dtype, n_ctx=n_ctx,
                                         fast_prefill=how.fast_prefill)
    from rh_lens import _hf_dir

    return _hf_dir.load(path, config, device=device, dtype=dtype, n_ctx=n_ctx)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _load_named(name: str, device, dtype, n_ctx, how: _How) -> Model:
    try:
        from transformer_lens import loading_from_pretrained as loading
    except ImportError:  # transformer-lens 4.x: names are Hugging Face repository ids
        loading = None
    official = name
    if loading is not None:
        try:
            official = loading.get_official_model_name(name)
        except ValueError:
            if not how.bridge or "/" not in name:
                close = difflib.get_close_matches(name, loading.OFFICIAL_MODEL_NAMES, n=3,
                                                  cutoff=0.6)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ModelLoadError(
                    f"unknown model spec {name!r}: not an existing path, not 'zoo:NAME' or "
                    f"'llama2c:PATH', and not a TransformerLens model name.{hint}"
                ) from None
    _require_weights_reachable(official)
    if how.bridge:
        return _bridge.load_named(official, device=device, dtype=dtype, n_ctx=n_ctx,
                                  fast_prefill=how.fast_prefill)
    with quiet_loading():
        try:
            return HookedTransformer.from_pretrained_no_processing(
                official, device=device, dtype=dtype, n_ctx=n_ctx
            )
        except OSError as err:
            raise ModelLoadError(f"could not load {official!r}: {err}") from err


def _official_name(name: str) -> str:
    """The Hugging Face repository of a TransformerLens alias (``pythia-70m``); other names as
    given."""
    try:
        from transformer_lens import loading_from_pretrained as loading

        return loading.get_official_model_name(name)
    except (ImportError, ValueError):
        return name


_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def _revision_snapshot(official: str, revision: str) -> Path:
    """The directory of ``official`` at ``revision``: the local Hugging Face cache's snapshot,
    else downloaded (config, tokenizer and weights only)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(official, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    cache = Path(constants.HF_HUB_CACHE) / f"models--{official.replace('/', '--')}"
    known = sorted(p.name for p in (cache / "refs").glob("*")) if cache.is_dir() else []
    why = _hub_unreachable()
    if why is not None:
        raise ModelLoadError(
            f"revision {revision!r} of {official!r} is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}; cached revisions: {', '.join(known) or 'none'}) and "
            f"{why}") from None
    try:
        path = Path(snapshot_download(official, revision=revision,
                                      allow_patterns=_SNAPSHOT_FILES))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(official, revision=revision,
                                          allow_patterns=["pytorch_model*.bin"]))
    except RevisionNotFoundError:
        raise ModelLoadError(f"{official!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"no Hugging Face repository {official!r}") from None
    return path


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (offline mode, no connection), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        return f"the Hub at {host} cannot be reached ({err})"
    return None


def _require_weights_reachable(official: str) -> None:
    """Fail fast, with advice, when a named model is neither cached nor downloadable."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(official, "config.json")
    if isinstance(cached, str):
        return
    advice = (
        f"model {official!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        "{why}. Download it where you have network (huggingface-cli download "
        f"{official}) or pass the path of a local checkpoint directory to load_model."
    )
    why = _hub_unreachable()
    if why is not None:
        raise ModelLoadError(advice.format(why=why))


# --------------------------------------------------------------------------------------------
# rh_lens's own directory format (used by the zoo)


def save_model_dir(
    path: str | os.PathLike,
    *,
    cfg: HookedTransformerConfig,
    state_dict: dict[str, Tensor],
    tokenizer,
    card: dict | None = None,
) -> Path:
    """Write a model as ``config.json`` + ``model.safetensors`` + tokenizer files (+ ``card.json``).

    ``load_model(path)`` reads it back.  Buffers that TransformerLens rebuilds are not stored.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.detach().to("cpu").contiguous()
        for k, v in state_dict.items()
        if not is_rebuilt_buffer(k)
    }
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"rh_lens_format": FORMAT_VERSION, "hooked_config": _config_to_json(cfg)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(path))
    if card is not None:
        (path / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return path


_RUNTIME_FIELDS = {"device", "n_devices", "dtype", "tokenizer_prepends_bos", "model_name"}


def _config_to_json(cfg: HookedTransformerConfig) -> dict:
    out = {}
    for field in dataclasses.fields(cfg):
        if field.name in _RUNTIME_FIELDS:
            continue
        value = getattr(cfg, field.name)
        if isinstance(value, (str, int, float, bool, type(None), list, dict)):
            out[field.name] = value
    out["model_name"] = cfg.model_name
    return out


def _load_rh_lens_dir(path: Path, device, dtype, n_ctx, how: _How) -> Model:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    config = _read_json(path / "config.json")
    version = config.get("rh_lens_format")
    if version != FORMAT_VERSION or not isinstance(config.get("hooked_config"), dict):
        raise ModelLoadError(
            f"{path / 'config.json'}: unsupported rh_lens_format {version!r} "
            f"(this rh_lens reads {FORMAT_VERSION})"
        )
    fields = dict(config["hooked_config"])
    if n_ctx is not None:
        require_rotary(fields.get("positional_embedding_type"), fields["n_ctx"], n_ctx, path)
        fields["n_ctx"] = n_ctx
    if not how.bridge:
        try:
            cfg = HookedTransformerConfig(**fields, device=str(device), dtype=dtype)
        except (TypeError, ValueError, AssertionError) as err:
            raise ModelLoadError(f"{path / 'config.json'}: invalid model config: {err}") from err
    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise ModelLoadError(f"{path} has no model.safetensors")
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{weights_path} is corrupt or truncated: {err}") from err
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if how.bridge:
        return _bridge.load_hooked_format(fields, state_dict, tokenizer, device=device,
                                          dtype=dtype, fast_prefill=how.fast_prefill,
                                          source=str(path))
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    return build_model(cfg, state_dict, tokenizer)


# --------------------------------------------------------------------------------------------
# Validation of whatever was loaded


def _validate(model: Model) -> None:
    from rh_lens import hooks

    facts = model_facts(model)
    if facts.n_heads % facts.n_kv_heads:
        raise ModelLoadError(
            f"{facts.name}: {facts.n_heads} query heads do not divide into "
            f"{facts.n_kv_heads} key/value heads"
        )
    missing = sorted(set(hooks.required_hook_names(facts.n_layers)) - set(model.hook_dict))
    if missing:
        raise ModelLoadError(
            f"{facts.name}: the model lacks hook points rh_lens relies on: {missing[:6]}"
        )
    if model.tokenizer is None:
        raise ModelLoadError(f"{facts.name}: loaded without a tokenizer")
