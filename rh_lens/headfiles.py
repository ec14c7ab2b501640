"""Head files of other methods: DuoAttention's ``full_attention_heads.tsv`` and QRHead's head-set
YAML (the reference's ``head_score.json`` is :func:`rh_lens.results.import_reference_json`).

- DuoAttention: one row per layer, one tab-separated gate value per (key/value) head, in [0, 1];
  read as a ``[n_layers, n_columns]`` table.
- QRHead: ``attn_head_set: "L-H,L-H,..."``, a head set (no scores); read as heads, checked
  against a model's shape when given, and as a 0/1 table by :func:`head_set_table`.

This module needs numpy only.
"""

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rh_lens.heads import Head, validate_heads
from rh_lens.results import ResultFileError, atomic_open

_QR_LINE = re.compile(r"""^\s*attn_head_set\s*:\s*(["']?)(.*?)\1\s*(#.*)?$""")


def read_duo_tsv(path: str | Path) -> np.ndarray:
    """``[n_layers, n_columns]`` float64 gate values; a ``ResultFileError`` naming the row and
    value for ragged rows, non-numbers and values outside [0, 1]."""
    path = Path(path)
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ResultFileError(f"{path}: empty (expected one row of gate values per layer)")
    table = []
    for i, line in enumerate(rows):
        values = []
        for item in line.strip().split("\t"):
            try:
                value = float(item)
            except ValueError:
                raise ResultFileError(f"{path}: layer {i}: {item!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ResultFileError(f"{path}: layer {i}: gate value {item} is outside [0, 1]")
            values.append(value)
        if table and len(values) != len(table[0]):
            raise ResultFileError(f"{path}: layer {i} has {len(values)} heads, layer 0 has "
                                  f"{len(table[0])} (every row must have the same number)")
        table.append(values)
    return np.array(table, dtype=np.float64)


def write_duo_tsv(path: str | Path, table) -> Path:
    """Write a ``[n_layers, n_columns]`` table of values in [0, 1] as DuoAttention's TSV."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"a DuoAttention table is [n_layers, n_heads], got shape {table.shape}")
    if not (np.isfinite(table).all() and (table >= 0).all() and (table <= 1).all()):
        raise ValueError("DuoAttention gate values must be in [0, 1]")
    with atomic_open(path, "w") as f:
        for row in table:
            f.write("\t".join(repr(float(v)) for v in row) + "\n")
    return Path(path)


def read_qrhead_yaml(path: str | Path, *, n_layers: int | None = None,
                     n_heads: int | None = None) -> tuple[Head, ...]:
    """The heads of a QRHead ``attn_head_set: "L-H,..."`` file, in order; checked against the
    shape when ``n_layers`` and ``n_heads`` are given (an unknown head is an error)."""
    path = Path(path)
    found = [m for line in path.read_text(encoding="utf-8").splitlines()
             if (m := _QR_LINE.match(line))]
    if len(found) != 1:
        raise ResultFileError(f'{path}: expected one line attn_head_set: "L-H,L-H,...", found '
                              f"{len(found)}")
    heads = []
    for item in found[0][2].split(","):
        match = re.fullmatch(r"\s*(\d+)-(\d+)\s*", item)
        if match is None:
            raise ResultFileError(f"{path}: bad head {item!r} in attn_head_set (write "
                                  "LAYER-HEAD, e.g. 16-19)")
        heads.append(Head(int(match[1]), int(match[2])))
    if n_layers is not None and n_heads is not None:
        try:
            return validate_heads(heads, n_layers, n_heads)
        except ValueError as err:
            raise ResultFileError(f"{path}: unknown head: {err}") from None
    return tuple(dict.fromkeys(heads))


def write_qrhead_yaml(path: str | Path, heads: Iterable) -> Path:
    """Write heads as QRHead's ``attn_head_set: "L-H,..."``."""
    items = [f"{int(a)}-{int(b)}" for a, b in heads]
    if not items:
        raise ValueError("a QRHead head set needs at least one head")
    with atomic_open(path, "w") as f:
        f.write(f'attn_head_set: "{",".join(items)}"\n')
    return Path(path)


def head_set_table(heads: Iterable, *, n_layers: int, n_heads: int) -> np.ndarray:
    """``[n_layers, n_heads]``: 1.0 for the heads of the set, 0.0 elsewhere."""
    table = np.zeros((n_layers, n_heads))
    for layer, head in validate_heads(heads, n_layers, n_heads):
        table[layer, head] = 1.0
    return table
