"""Results on disk: provenance, atomic writers, result directories and the reference's JSON.

A run writes one directory: ``result.json`` (schema version, kind, config, run metadata, summary,
manifest of the arrays) + ``arrays.npz``.  Every file is written atomically (temp file beside it,
then ``os.replace``) and never merged into; no pickle (``np.load(allow_pickle=False)``).
Retrieval scores also travel in the reference's ``{"layer-head": [score per trial]}`` JSON.
"""

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jaxtyping import Float

from rh_lens.errors import RhLensError

SCHEMA_VERSION = 1
RESULT_JSON = "result.json"
ARRAYS_NPZ = "arrays.npz"

_HEAD_KEY = re.compile(r"(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")
_GIT_TIMEOUT_S = 5.0


class ResultFileError(RhLensError):
    """A result or score file is missing, malformed, or of an unexpected kind or version."""


# --------------------------------------------------------------------------------------------
# Provenance


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the git checkout that holds this rh_lens package, or None (never raises)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False,
        )
        toplevel, commit = out.stdout.splitlines()
        # An installed copy (site-packages inside some repo) must not report that repo's commit.
        if out.returncode != 0 or Path(toplevel).resolve() != root:
            return None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA setup must not stop a run from recording itself
        return False


@dataclass(frozen=True)
class RunMetadata:
    """Who computed a result, with what, on which model: stored with every result."""

    model_spec: str
    model_name: str | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_key_value_heads: int | None = None
    d_head: int | None = None
    n_ctx: int | None = None
    dtype: str | None = None
    device: str | None = None
    backend: str | None = None  # "hooked" (HookedTransformer) or "bridge" (TransformerBridge)
    seed: int | None = None
    argv: tuple[str, ...] | None = None
    started_at: str | None = None
    git_commit: str | None = None
    hostname: str | None = None
    cuda_available: bool | None = None
    rh_lens_version: str | None = None
    torch_version: str | None = None
    transformer_lens_version: str | None = None
    transformers_version: str | None = None
    numpy_version: str | None = None
    python_version: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def collect(cls, *, model_spec: str, model: Any = None, seed: int | None,
                argv: list[str] | None, extra: dict | None = None) -> "RunMetadata":
        """Record the environment now; model facts come from ``model.cfg`` when given."""
        extra = to_jsonable(dict(extra or {}), where="extra")
        facts: dict[str, Any] = {}
        if model is not None:
            from rh_lens.models import backend_of

            cfg = model.cfg
            facts = dict(
                model_name=str(cfg.model_name), n_layers=int(cfg.n_layers),
                n_heads=int(cfg.n_heads),
                n_key_value_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
                d_head=int(cfg.d_head), n_ctx=int(cfg.n_ctx), dtype=str(cfg.dtype),
                device=None if cfg.device is None else str(cfg.device),
                backend=backend_of(model),
            )
        return cls(
            model_spec=model_spec, **facts, seed=seed, extra=extra,
            argv=None if argv is None else tuple(str(a) for a in argv),
            started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            git_commit=_git_commit(), hostname=socket.gethostname(),
            cuda_available=_cuda_available(), rh_lens_version=_version("rh_lens"),
            torch_version=_version("torch"), transformer_lens_version=_version("transformer_lens"),
            transformers_version=_version("transformers"),
            numpy_version=np.__version__, python_version=platform.python_version(),
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["argv"] = None if self.argv is None else list(self.argv)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunMetadata":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ResultFileError(f"unknown run metadata fields: {', '.join(unknown)}")
        if "model_spec" not in data:
            raise ResultFileError("run metadata has no model_spec")
        values = dict(data)
        if values.get("argv") is not None:
            values["argv"] = tuple(values["argv"])
        values["extra"] = dict(values.get("extra") or {})
        return cls(**values)


# --------------------------------------------------------------------------------------------
# JSON values and atomic writers


def to_jsonable(obj: Any, *, nan_to_none: bool = False, where: str = "value") -> Any:
    """``obj`` with numpy scalars/arrays and tuples turned into plain JSON values.

    A non-finite float raises a ``ValueError`` naming where it is, unless ``nan_to_none``
    (then it becomes ``None``; say so where the value is documented).
    """
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nan_to_none:
            return None
        raise ValueError(f"{where} is {obj}; JSON has no NaN/inf, convert it to None explicitly")
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}")
            out[key] = to_jsonable(value, nan_to_none=nan_to_none, where=f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nan_to_none=nan_to_none, where=f"{where}[{i}]")
                for i, v in enumerate(obj)]
    raise ValueError(f"{where} is a {type(obj).__name__}, which JSON cannot hold")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: Literal["w", "wb"]) -> Iterator[Any]:
    """Yield a temp file beside ``path``; on success it replaces ``path``, else it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); keep an existing file's mode, else 0644.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None) -> Path:
    """Write ``obj`` as strict JSON (no NaN) to ``path`` atomically; returns the path."""
    path = Path(path)
    try:
        with atomic_open(path, "w") as f:
            json.dump(obj, f, allow_nan=False, indent=indent)
            f.write("\n")
    except (TypeError, ValueError) as err:
        raise ResultFileError(f"{path}: cannot write as JSON ({err}); nothing was written") from err
    return path


def write_npz_atomic(path: str | Path, /, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz`` atomically, without pickle."""
    path = Path(path)
    prepared = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if not name or "/" in name:
            raise ResultFileError(f"{path}: bad array name {name!r}")
        if arr.dtype.hasobject:
            raise ResultFileError(
                f"{path}: array {name!r} has dtype {arr.dtype}, which needs pickle; "
                "store numbers, booleans or fixed-width strings"
            )
        prepared[name] = arr
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, mode="w", allowZip64=True) as zf:
        for name, arr in prepared.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
    return path


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a ``ValueError`` naming the file if it is unreadable or malformed."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_no_duplicate_keys)
    except OSError as err:
        raise ResultFileError(f"{path}: cannot read ({err.strerror or err})") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise ResultFileError(f"{path}: not valid JSON ({err})") from err


# --------------------------------------------------------------------------------------------
# Result directories


@dataclass(frozen=True)
class LoadedResult:
    """A result directory read back: ``meta`` as stored (see :meth:`run_metadata`)."""

    path: Path
    kind: str
    config: dict
    meta: dict
    summary: dict
    arrays: dict[str, np.ndarray]

    def run_metadata(self) -> RunMetadata:
        return RunMetadata.from_dict(self.meta)


def _manifest(arrays: dict[str, np.ndarray]) -> dict:
    return {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in arrays.items()}


def save_result(directory: str | Path, *, kind: str, config: dict, meta: RunMetadata,
                summary: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``result.json`` + ``arrays.npz`` into ``directory`` (created if needed).

    A directory holding a result of another ``kind`` (or an unreadable one) is refused; one of
    the same kind is replaced as a whole, never merged.  ``result.json`` is written last, so a
    directory without it holds no complete result.  NaN in ``config``/``summary`` raises:
    convert it to None (``to_jsonable(..., nan_to_none=True)``).
    """
    directory = Path(directory)
    if not kind or not isinstance(kind, str):
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    try:
        record = {"schema_version": SCHEMA_VERSION, "kind": kind,
                  "config": to_jsonable(config, where="config"),
                  "meta": to_jsonable(meta.to_dict(), where="meta"),
                  "summary": to_jsonable(summary, where="summary")}
    except ValueError as err:
        raise ResultFileError(f"{directory}: {err}; nothing was written") from err
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    record["arrays"] = _manifest(arrays)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / RESULT_JSON
    if json_path.exists():
        existing = read_json(json_path)
        old_kind = existing.get("kind") if isinstance(existing, dict) else None
        if old_kind != kind:
            raise ResultFileError(
                f"{directory} already holds a result of kind {old_kind!r}, not {kind!r}; "
                "write each run to a new directory"
            )
        json_path.unlink()  # until the new result.json lands, the directory reads as incomplete
    write_npz_atomic(directory / ARRAYS_NPZ, **arrays)
    write_json_atomic(json_path, record, indent=2)
    return directory


def load_result(directory: str | Path, *, kind: str | None = None) -> LoadedResult:
    """Read a directory written by :func:`save_result` (of ``kind`` when given); a
    ``ValueError`` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ResultFileError(f"{directory}: no such result directory")
    json_path, npz_path = directory / RESULT_JSON, directory / ARRAYS_NPZ
    if not json_path.is_file():
        raise ResultFileError(f"{directory}: no {RESULT_JSON} (not a result, or an unfinished run)")
    record = read_json(json_path)
    if not isinstance(record, dict):
        raise ResultFileError(f"{json_path}: expected a JSON object")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultFileError(
            f"{json_path}: schema_version {version!r}, this rh_lens reads {SCHEMA_VERSION}"
        )
    for key, typ in [("kind", str), ("config", dict), ("meta", dict), ("summary", dict),
                     ("arrays", dict)]:
        if not isinstance(record.get(key), typ):
            raise ResultFileError(f"{json_path}: missing or malformed {key!r}")
    if not npz_path.is_file():
        raise ResultFileError(f"{directory}: {RESULT_JSON} present but no {ARRAYS_NPZ}")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:  # BadZipFile, OSError, ValueError (pickled data), ...
        raise ResultFileError(f"{npz_path}: cannot load arrays ({err})") from err
    if _manifest(arrays) != record["arrays"]:
        raise ResultFileError(
            f"{npz_path}: arrays do not match the manifest in {RESULT_JSON} "
            f"(found {_manifest(arrays)}, expected {record['arrays']})"
        )
    if kind is not None and record["kind"] != kind:
        raise ResultFileError(f"{directory}: a {record['kind']!r} result, not {kind!r}")
    return LoadedResult(directory, record["kind"], record["config"], record["meta"],
                        record["summary"], arrays)


# --------------------------------------------------------------------------------------------
# The reference's {"layer-head": [...]} score files


def export_reference_json(
    path: str | Path, trial_scores: Float[np.ndarray, "n_trials n_layers n_heads"]
) -> Path:
    """Write per-trial head scores as ``{"l-h": [score per trial]}``, layer-major keys."""
    scores = np.asarray(trial_scores, dtype=np.float64)
    if scores.ndim != 3:
        raise ValueError(f"trial_scores must be [n_trials, n_layers, n_heads], got {scores.shape}")
    if scores.shape[0] == 0:
        raise ValueError(f"{path}: zero trials to export")
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: trial_scores hold NaN/inf; the reference format has no NaN")
    n_layers, n_heads = scores.shape[1:]
    obj = {f"{layer}-{head}": scores[:, layer, head].tolist()
           for layer in range(n_layers) for head in range(n_heads)}
    return write_json_atomic(path, obj)


def import_reference_json(path: str | Path) -> Float[np.ndarray, "n_trials n_layers n_heads"]:
    """Read a reference score file into ``[n_trials, n_layers, n_heads]`` (float64).

    The grid size is inferred from the keys; every layer x head must be present with the same,
    non-zero number of finite scores.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise ResultFileError(f'{path}: expected a non-empty object {{"layer-head": [...]}}')
    cells: dict[tuple[int, int], list] = {}
    first_key = None
    for key, values in data.items():
        match = _HEAD_KEY.fullmatch(key)
        if match is None:
            raise ResultFileError(f'{path}: bad key {key!r}, expected "<layer>-<head>"')
        if not isinstance(values, list):
            raise ResultFileError(f"{path}: {key!r} holds a {type(values).__name__}, not a list")
        if first_key is None:
            first_key = key
        elif len(values) != len(data[first_key]):
            raise ResultFileError(
                f"{path}: ragged trials: {first_key!r} has {len(data[first_key])} scores, "
                f"{key!r} has {len(values)}"
            )
        if not all(type(v) in (int, float) for v in values):
            bad = next(v for v in values if type(v) not in (int, float))
            raise ResultFileError(f"{path}: {key!r} holds {bad!r}, not a number")
        cells[(int(match[1]), int(match[2]))] = values
    n_trials = len(data[first_key])
    if n_trials == 0:
        raise ResultFileError(f"{path}: zero trials (every score list is empty)")
    n_layers = 1 + max(layer for layer, _ in cells)
    n_heads = 1 + max(head for _, head in cells)
    if len(cells) != n_layers * n_heads:
        missing = next((layer, head) for layer in range(n_layers) for head in range(n_heads)
                       if (layer, head) not in cells)
        raise ResultFileError(
            f"{path}: incomplete grid: {len(cells)} of {n_layers}x{n_heads} heads present, "
            f"'{missing[0]}-{missing[1]}' is missing"
        )
    out = np.empty((n_trials, n_layers, n_heads), dtype=np.float64)
    for (layer, head), values in cells.items():
        try:
            out[:, layer, head] = values
        except OverflowError:
            msg = f"{path}: '{layer}-{head}' holds a number beyond float64"
            raise ResultFileError(msg) from None
    if not np.isfinite(out).all():
        t, layer, head = np.argwhere(~np.isfinite(out))[0]
        raise ResultFileError(f"{path}: '{layer}-{head}' trial {t} is {out[t, layer, head]}, "
                              "not finite")
    return out
