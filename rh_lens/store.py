"""The resumable sweep store: one directory per sweep, one record per finished cell.

Detection, ablation and chain-of-thought runs are sweeps over cells (a NIAH trial, a task under
one masking condition).  Each writes its cells into a :class:`SweepStore`::

    root/sweep.json                   what the sweep is (config, model, inputs): its identity
    root/cells/<key>.json [+ .npz]    one record per finished cell
    root/conditions/<name>/...        a sub-store per head set, with its own identity file

A record's arrays are written first and its JSON last, each atomically, so a record exists once
its JSON does and a killed run loses at most the cell it was on.  Opening a store with another
sweep's identity is refused, so one directory never mixes two sweeps; :func:`shard` splits the
cells of a sweep over machines and :func:`merge` reads the stores of the shards back as one.
"""

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from rh_lens.errors import RhLensError
from rh_lens.results import read_json, write_json_atomic, write_npz_atomic

IDENTITY = "sweep.json"
CELLS = "cells"
FORMAT_KEY = "record_format"
FORMAT = 1
# Keys that marked a record's format before the store had one family; read, never written.
_LEGACY_FORMAT_KEYS = ("cell_format", "format")

T = TypeVar("T")
R = TypeVar("R")


class StoreError(RhLensError):
    """A store directory that holds another sweep, or a record that cannot be read."""


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Shard ``(index, count)`` of ``items``: ``items[index::count]``, so ``count`` shards cover
    every item exactly once."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return list(items)[index::count]


def unit(key: str, condition: str | None = None) -> str:
    """Where the record of cell ``key`` (of the sub-store ``condition``) lies under a store's
    root, without its suffix: the name a launcher plans and tracks it by."""
    return f"{CELLS}/{key}" if condition is None else f"conditions/{condition}/{CELLS}/{key}"


def finished_units(root: str | Path) -> set[str]:
    """The :func:`unit` names of every finished record under ``root``, sub-stores included."""
    root = Path(root)
    found = [*root.glob(f"{CELLS}/*.json"), *root.glob(f"conditions/*/{CELLS}/*.json")]
    return {p.relative_to(root).with_suffix("").as_posix() for p in found}


def as_read_back(obj: dict) -> dict:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class Record:
    """A stored cell: its JSON fields and its arrays (empty when it has none)."""

    key: str
    fields: dict
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class SweepStore:
    """The cells of one sweep in ``root``, under the identity kept in ``root / identity_file``."""

    root: Path
    identity_file: str = IDENTITY

    @classmethod
    def open(cls, root: str | Path, identity: dict, *, identity_file: str = IDENTITY,
             what: str = "sweep") -> "SweepStore":
        """The store at ``root``, created with ``identity`` if new; a store that holds another
        sweep (``what`` names it in the message) is refused with the fields that differ."""
        store = cls(Path(root), identity_file)
        path = store.root / identity_file
        wanted = as_read_back(identity)
        if path.is_file() and not store._holds_records():  # a run refused before its first cell
            write_json_atomic(path, wanted)
        elif path.is_file():
            existing = read_json(path)
            if existing != wanted:
                diff = sorted(k for k in set(existing) | set(wanted)
                              if existing.get(k) != wanted.get(k))
                raise StoreError(f"{store.root} holds cells of a different {what} (differs in: "
                                 f"{', '.join(diff)}); use a new output directory")
        else:
            store.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, wanted)
        return store

    def _holds_records(self) -> bool:
        """Whether any cell is stored here, in a sub-store included."""
        return any(self.root.glob(f"{CELLS}/*.json")) or any(
            self.root.glob(f"conditions/*/{CELLS}/*.json"))

    def identity(self) -> dict:
        path = self.root / self.identity_file
        if not path.is_file():
            raise StoreError(f"{self.root} is not a sweep directory (no {self.identity_file})")
        return read_json(path)

    def sub(self, name: str, identity: dict, *, identity_file: str) -> "SweepStore":
        """The sub-store ``root/conditions/<name>`` (one head set of an ablation or CoT sweep)."""
        return SweepStore.open(self.root / "conditions" / name, identity,
                               identity_file=identity_file,
                               what=f"head set named {name!r} (other scores or seed?)")

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / CELLS
        return folder / f"{key}.json", folder / f"{key}.npz"

    def finished(self, *, with_arrays: bool = True) -> dict[str, Path]:
        """The keys of the finished cells and their JSON files (``with_arrays``: only cells
        whose ``.npz`` is there too)."""
        folder = self.root / CELLS
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.json"))
                if not with_arrays or p.with_suffix(".npz").is_file()}

    def write(self, key: str, fields: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Store one cell: arrays first, then the JSON that marks it finished."""
        json_path, npz_path = self._paths(key)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if arrays is not None:
            write_npz_atomic(npz_path, **arrays)
        write_json_atomic(json_path, {FORMAT_KEY: FORMAT, **fields})

    def read(self, key: str, *, arrays: bool = True) -> Record:
        """A finished cell; a :class:`StoreError` naming the file when it cannot be read."""
        return read_record(self._paths(key)[0], arrays=arrays)


def read_finished(store: "SweepStore", keys: Sequence[str], parse: Callable[[Record], R], *,
                  recompute_bad: bool = False) -> dict[str, R]:
    """The finished cells among ``keys``, each parsed by ``parse``.  A cell that cannot be read
    (a truncated file, missing fields) is refused, naming its file, or left out to be computed
    again with ``recompute_bad``."""
    done = store.finished()
    out: dict[str, R] = {}
    for key in keys:
        if key not in done:
            continue
        try:
            out[key] = parse(store.read(key))
        except StoreError as err:
            if not recompute_bad:
                raise StoreError(f"{err}; rerun with --recompute-bad-cells to compute it "
                                 "again") from None
    return out


def read_record(json_path: str | Path, *, arrays: bool = True) -> Record:
    """The record whose JSON is ``json_path`` (its arrays beside it, in the ``.npz``)."""
    json_path = Path(json_path)
    try:
        data = read_json(json_path)
    except ValueError as err:  # unreadable or malformed JSON
        raise StoreError(str(err)) from None
    if not isinstance(data, dict):
        raise StoreError(f"{json_path}: not a sweep record (a JSON object)")
    version = next((data.pop(k) for k in (FORMAT_KEY, *_LEGACY_FORMAT_KEYS) if k in data), None)
    if version != FORMAT:
        raise StoreError(f"{json_path}: unknown record format {version!r}; this rh_lens reads "
                         f"{FORMAT}")
    loaded: dict[str, np.ndarray] = {}
    if arrays:
        npz_path = json_path.with_suffix(".npz")
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                loaded = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise StoreError(f"{npz_path}: cannot read the cell's arrays ({err})") from err
    return Record(json_path.stem, data, loaded)


def merge(roots: Sequence[str | Path], *, identity_file: str = IDENTITY,
          with_arrays: bool = True) -> tuple[dict, dict[str, Path]]:
    """The identity and finished cells (key -> JSON file) of the shard stores ``roots``, which
    must all hold the same sweep; a cell present in several shards is taken from the first."""
    identity = None
    found: dict[str, Path] = {}
    for root in map(Path, roots):
        store = SweepStore(root, identity_file)
        if not (root / identity_file).is_file():
            raise StoreError(f"{root} is not a sweep directory (no {identity_file})")
        this = store.identity()
        if identity is not None and this != identity:
            raise StoreError(f"{root} belongs to a different sweep than {roots[0]}")
        identity = this
        for key, path in store.finished(with_arrays=with_arrays).items():
            found.setdefault(key, path)
    if identity is None:
        raise StoreError("nothing to merge")
    return identity, found
