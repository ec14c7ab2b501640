"""Path patching: receivers, the hooks that patch the senders' output along the edges into
them, and the sender x receiver sweep (see :mod:`rh_lens.patching`)."""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from rh_lens import hooks
from rh_lens.heads import HeadLike, heads_by_layer, label, validate_heads
from rh_lens.hooks import HookList
from rh_lens.interventions import replace_output_hooks
from rh_lens.models import Model, set_hook_flags
from rh_lens.patching.pairs import PatchPair
from rh_lens.patching.runs import PatchConfig, _batches, _logit_diff, _Normalised, _run, _start

Component = Literal["q", "k", "v", "mlp", "direct"]
HEAD_COMPONENTS = ("q", "k", "v")
_INPUT_HOOK = {"q": hooks.q_input, "k": hooks.k_input, "v": hooks.v_input}


@dataclass(frozen=True)
class Receiver:
    """What reads the senders' output: ``Receiver("q", layer, head)`` (also ``"k"``, ``"v"``),
    ``Receiver("mlp", layer)`` or ``Receiver("direct")`` (the logits)."""

    component: Component
    layer: int | None = None
    head: int | None = None

    def __post_init__(self):
        c = self.component
        if c not in ("q", "k", "v", "mlp", "direct"):
            raise ValueError(f"receiver component must be q, k, v, mlp or direct, got {c!r}")
        wants = (c != "direct", c in HEAD_COMPONENTS)
        if (self.layer is not None, self.head is not None) != wants:
            raise ValueError(f"a {c!r} receiver takes {'a layer' if wants[0] else 'no layer'} and "
                             f"{'a head' if wants[1] else 'no head'}, got layer={self.layer}, "
                             f"head={self.head}")

    @property
    def label(self) -> str:
        if self.component == "direct":
            return "direct"
        if self.component == "mlp":
            return f"MLP{self.layer}"
        return f"{label((self.layer, self.head))}.{self.component}"

    def reads_layer(self, model) -> int:
        """The receiver reads what senders in layers below this one wrote."""
        cfg = model.cfg
        if self.component == "direct":
            return cfg.n_layers
        if self.component == "mlp":
            return self.layer if cfg.parallel_attn_mlp else self.layer + 1
        return self.layer


def head_receivers(heads: Sequence[HeadLike], components: Sequence[str]) -> tuple[Receiver, ...]:
    """Receivers for ``components`` (``q``, ``k``, ``v``, ``direct``) of ``heads``: head by head,
    then ``direct`` once."""
    bad = [c for c in components if c not in (*HEAD_COMPONENTS, "direct")]
    if bad:
        raise ValueError(f"component must be q, k, v or direct, got {bad[0]!r}")
    out = [Receiver(c, layer, head) for layer, head in heads
           for c in HEAD_COMPONENTS if c in components]
    return tuple(dict.fromkeys(out + [Receiver("direct")] * ("direct" in components)))


def all_receivers(model: Model, senders: Sequence[HeadLike]) -> tuple[Receiver, ...]:
    """Every reader of the senders' output: later heads' q, k, v, MLPs, and the logits."""
    senders = validate_heads(senders, model.cfg.n_layers, model.cfg.n_heads)
    first = min(layer for layer, _ in senders)
    out = [Receiver(c, layer, head) for layer in range(first + 1, model.cfg.n_layers)
           for head in range(model.cfg.n_heads) for c in HEAD_COMPONENTS]
    if not model.cfg.attn_only:
        out += [r for r in (Receiver("mlp", layer) for layer in range(model.cfg.n_layers))
                if r.reads_layer(model) > first]
    return (*out, Receiver("direct"))


def _validate_receivers(model, receivers: Sequence[Receiver]) -> tuple[Receiver, ...]:
    receivers = tuple(dict.fromkeys(receivers))
    if not receivers:
        raise ValueError("no receivers")
    cfg = model.cfg
    for r in receivers:
        if not isinstance(r, Receiver):
            raise ValueError(f"receivers must be Receiver objects, got {r!r}")
        if r.layer is not None and not 0 <= r.layer < cfg.n_layers:
            raise ValueError(
                f"receiver {r.label}: layer {r.layer} out of range [0, {cfg.n_layers})")
        if r.head is not None and not 0 <= r.head < cfg.n_heads:
            raise ValueError(
                f"receiver {r.label}: head {r.head} out of range [0, {cfg.n_heads})")
        if r.component == "mlp" and cfg.attn_only:
            raise ValueError(f"receiver {r.label}: the model has no MLPs")
    return receivers


def _mode_flags(model, receivers: Sequence[Receiver]) -> dict[str, bool]:
    comps = {r.component for r in receivers}
    flags = {}
    if comps & set(HEAD_COMPONENTS):
        flags["use_split_qkv_input"] = True
    if comps & {"k", "v"} and model.cfg.n_key_value_heads not in (None, model.cfg.n_heads):
        flags["ungroup_grouped_query_attention"] = True
    if "mlp" in comps:
        flags["use_hook_mlp_in"] = True
    return flags


@contextlib.contextmanager
def receiver_mode(model: Model, receivers: Sequence[Receiver]) -> Iterator[None]:
    """Switch on the model inputs that ``receivers`` need (TransformerLens's split q/k/v inputs,
    ungrouped keys/values for k/v receivers of grouped-query models, ``hook_mlp_in``), and restore
    the model's settings on exit, also after an exception.  Outputs are unchanged."""
    saved = set_hook_flags(model, _mode_flags(model, receivers))
    try:
        yield
    finally:
        set_hook_flags(model, saved)


def path_patching_hooks(model: Model, senders: Sequence[HeadLike],
                        receivers: Sequence[Receiver],
                        source_z: dict[int, Float[Tensor, "batch pos head_index d_head"]], *,
                        positions: Sequence[int]) -> HookList:
    """Hooks that give each receiver the senders' ``source_z`` output at ``positions`` (see the
    module docstring); run them inside :func:`receiver_mode` with the same receivers."""
    cfg = model.cfg
    senders = validate_heads(senders, cfg.n_layers, cfg.n_heads)
    if not senders:
        raise ValueError("no senders")
    receivers = _validate_receivers(model, receivers)
    missing = [n for n, v in _mode_flags(model, receivers).items() if getattr(cfg, n) != v]
    if missing:
        raise RuntimeError(f"model.cfg.{missing[0]} is off: run path patching inside "
                           "`with receiver_mode(model, receivers):`")
    first = min(layer for layer, _ in senders)
    for r in receivers:
        if r.reads_layer(model) <= first:
            raise ValueError(f"receiver {r.label} does not read the output of any sender "
                             f"(earliest sender layer: {first})")
    by_layer = heads_by_layer(senders)
    pos = list(positions)
    run_z: dict[int, Tensor] = {}  # the senders' output in this pass
    deltas: dict[int, Tensor] = {}

    def capture(layer: int):
        def hook(z: Float[Tensor, "batch pos head_index d_head"], hook) -> None:
            run_z[layer] = z[:, pos][:, :, by_layer[layer]]

        return hook

    def delta(upto: int) -> Float[Tensor, "batch n_patched d_model"]:
        """Source minus this pass's output of the senders below layer ``upto``, through W_O."""
        if upto not in deltas:
            total = None
            for layer, heads in by_layer.items():
                if layer >= upto:
                    continue
                here = run_z[layer]
                diff = source_z[layer][:, pos][:, :, heads].to(here) - here
                w_o = model.blocks[layer].attn.W_O[heads].to(here)
                term = torch.einsum("bphd,hdm->bpm", diff, w_o)
                total = term if total is None else total + term
            deltas[upto] = total
        return deltas[upto]

    def add(x: Tensor, upto: int, heads: list[int] | None) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        d = delta(upto).to(out.dtype)
        if heads is None:
            out[:, pos] = out[:, pos] + d
        else:
            sub = out[:, pos]
            sub[:, :, heads] = sub[:, :, heads] + d[:, :, None]
            out[:, pos] = sub
        return out

    fwd: HookList = [(hooks.z(layer), capture(layer)) for layer in by_layer]
    grouped: dict[tuple[str, int], list[int]] = {}
    for r in receivers:
        if r.component in HEAD_COMPONENTS:
            grouped.setdefault((r.component, r.layer), []).append(r.head)
        elif r.component == "mlp":
            upto = r.reads_layer(model)
            fwd.append((hooks.mlp_in(r.layer), lambda x, hook, u=upto: add(x, u, None)))
        else:
            fwd.append((hooks.resid_post(cfg.n_layers - 1),
                        lambda x, hook: add(x, cfg.n_layers, None)))
    for (comp, layer), heads in grouped.items():
        fwd.append((_INPUT_HOOK[comp](layer), lambda x, hook, u=layer, h=heads: add(x, u, h)))
    return fwd


# --------------------------------------------------------------------------------------------
# Path patching


def path_patch(model: Model, pairs: Sequence[PatchPair], senders: Sequence[HeadLike],
               receivers: Sequence[Receiver], cfg: PatchConfig | None = None) -> np.ndarray:
    """The metric (logit difference per pair, ``[n_pairs]``) with the senders, jointly, patched
    along the paths that start with an edge into one of ``receivers``."""
    return _path_patch(model, pairs, senders, receivers, cfg or PatchConfig())[0]


def _path_patch(model: Model, pairs: Sequence[PatchPair], senders: Sequence[HeadLike],
                receivers: Sequence[Receiver], cfg: PatchConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`path_patch`'s metric and the clean and corrupted runs' (each ``[n_pairs]``)."""
    senders = validate_heads(senders, model.cfg.n_layers, model.cfg.n_heads)
    receivers = _validate_receivers(model, receivers)
    out = np.full(len(pairs), np.nan)
    clean, corrupted = np.zeros(len(pairs)), np.zeros(len(pairs))
    layers = sorted(heads_by_layer(senders))
    with torch.no_grad(), receiver_mode(model, receivers):
        for batch in _batches(model, pairs, cfg):
            source_z = _start(model, batch, clean, corrupted, layers)
            fwd = path_patching_hooks(model, senders, receivers, source_z,
                                      positions=batch.positions)
            out[batch.index] = _logit_diff(_run(model, batch.base, fwd), batch)
    return out, clean, corrupted


@dataclass(frozen=True)
class PathPatchingResult(_Normalised):
    """``logit_diff[pair, sender, receiver]``: the metric with one sender patched along its edge
    into one receiver (NaN where the receiver does not read the sender: same or earlier layer);
    ``total[pair, sender]``: the sender activation-patched (all paths)."""

    senders: tuple[HeadLike, ...]
    receivers: tuple[Receiver, ...]
    logit_diff: Float[np.ndarray, "n_pairs n_senders n_receivers"]
    total: Float[np.ndarray, "n_pairs n_senders"]
    clean_logit_diff: Float[np.ndarray, " n_pairs"]
    corrupted_logit_diff: Float[np.ndarray, " n_pairs"]
    config: PatchConfig

    @property
    def effect(self) -> Float[np.ndarray, "n_senders n_receivers"]:
        """Change from the unpatched run, in units of the clean - corrupted gap."""
        return self._effect(self.logit_diff)

    @property
    def total_effect(self) -> Float[np.ndarray, " n_senders"]:
        return self._effect(self.total)

    @property
    def normalized(self) -> Float[np.ndarray, "n_senders n_receivers"]:
        """0 = the corrupted run's logit difference, 1 = the clean run's."""
        return self._normalized(self.logit_diff)

    @property
    def sender_labels(self) -> list[str]:
        return [label(h) for h in self.senders]

    @property
    def receiver_labels(self) -> list[str]:
        return [r.label for r in self.receivers]


def compute_path_patching(model: Model, pairs: Sequence[PatchPair],
                          senders: Sequence[HeadLike], receivers: Sequence[Receiver],
                          cfg: PatchConfig | None = None, *,
                          progress: bool = False) -> PathPatchingResult:
    """The sender x receiver matrix: each sender alone, through each receiver alone, plus each
    sender's activation-patching total.  One forward per (batch, sender, receiver)."""
    cfg = cfg or PatchConfig()
    senders = validate_heads(senders, model.cfg.n_layers, model.cfg.n_heads)
    if not senders:
        raise ValueError("no senders")
    receivers = _validate_receivers(model, receivers)
    n = len(pairs)
    out = np.full((n, len(senders), len(receivers)), np.nan)
    total = np.full((n, len(senders)), np.nan)
    clean, corrupted = np.zeros(n), np.zeros(n)
    layers = sorted(heads_by_layer(senders))
    batches = _batches(model, pairs, cfg)
    cells = [(i, j) for i, (layer, _) in enumerate(senders) for j, r in enumerate(receivers)
             if r.reads_layer(model) > layer]
    bar = tqdm(total=len(batches) * (len(cells) + len(senders)), disable=not progress,
               desc="path patching")
    with torch.no_grad(), receiver_mode(model, receivers):
        for batch in batches:
            source_z = _start(model, batch, clean, corrupted, layers)
            for i, sender in enumerate(senders):
                fwd = replace_output_hooks([sender], source_z, positions=batch.positions)
                total[batch.index, i] = _logit_diff(_run(model, batch.base, fwd), batch)
                bar.update()
            for i, j in cells:
                fwd = path_patching_hooks(model, [senders[i]], [receivers[j]], source_z,
                                          positions=batch.positions)
                out[batch.index, i, j] = _logit_diff(_run(model, batch.base, fwd), batch)
                bar.update()
    bar.close()
    return PathPatchingResult(senders, receivers, out, total, clean, corrupted, cfg)
