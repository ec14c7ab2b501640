"""Activation patching and path patching of attention heads on clean/corrupted prompt pairs.

**Pairs.**  A :class:`PatchPair` is a clean prompt (a needle with answer A) and a corrupted prompt
(the same needle with answer B) of equal token length, both ending where the first token in which
A and B differ is predicted (a shared answer prefix, such as `` the``, is appended to both).  The
metric is the logit difference ``logit[A] - logit[B]`` at that last position.  :func:`make_pair`
builds a pair from a needle and an alternative answer; :func:`zoo_pairs` from the zoo's needles.

**Direction.**  ``"denoise"`` (default) runs the corrupted prompt and patches in the clean run's
activations: an effect is the clean behaviour a component restores.  ``"noise"`` runs the clean
prompt and patches in the corrupted run's activations (Wang et al. 2022): an effect is the damage.
``normalized`` is 0 at the corrupted run's logit difference and 1 at the clean run's, in both
directions; ``effect`` is the change from the unpatched run on that scale (0: no effect; +1: full
recovery when denoising; -1: full damage when noising).  Logit differences are averaged over
pairs before normalising.

**Activation patching** replaces a head's output (``hook_z``) at the patch positions with the
source run's.

**Path patching** (Wang et al. 2022; Goldowsky-Dill et al. 2023).  One forward pass on the base
prompt in which every component reads the residual stream as usual, where the senders write their
output of *this* pass, except the receivers, which read it with the senders' terms replaced by
their source-run values: a receiver's input gets ``+ sum_s W_O^s (z_s^source - z_s^pass)`` at the
patch positions.  Components after a receiver are recomputed, so the receiver's changed output
propagates along every path.  The effect through receiver R is thus that of all paths whose first
edge is sender -> R.  Every other component, MLPs included, is *frozen* with respect to the
senders: it sees their base output, so a path sender -> MLP -> R counts only when that MLP is a
receiver too.  For receivers none of which reads another's output (one receiver; receivers in one
layer) this is exactly Wang et al.'s three-step procedure with all heads and MLPs frozen.  With
every reader as receiver (:func:`all_receivers`) it equals activation patching of the senders.

Receivers (:class:`Receiver`): a head's query, key or value input (the residual stream before
``ln1``; in grouped-query models per *query* head: the model runs with ungrouped keys/values while
patching, so the head's siblings keep theirs), a layer's MLP input, or ``direct``: the input of
``ln_final`` and the unembedding.  Patching runs inside :func:`receiver_mode`, which switches on
TransformerLens's split q/k/v inputs and restores the model's settings afterwards.
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from rh_lens import hooks
from rh_lens.errors import RhLensError
from rh_lens.hooks import Head, HookList, heads_by_layer, validate_heads
from rh_lens.models import Model, set_hook_flags, tokenize
from rh_lens.niah import Haystack, Needle, build_trial

Direction = Literal["denoise", "noise"]
Component = Literal["q", "k", "v", "mlp", "direct"]
PositionSpec = Literal["answer", "needle", "all"] | tuple[int, ...]
HEAD_COMPONENTS = ("q", "k", "v")


class PairError(RhLensError):
    """A clean/corrupted pair cannot be built (lengths differ, answers identical, ...)."""


# TODO move to hooks.py: per-head residual inputs (need cfg.use_split_qkv_input) and MLP input.
def _q_input(layer: int) -> str:
    return f"blocks.{layer}.hook_q_input"


def _k_input(layer: int) -> str:
    return f"blocks.{layer}.hook_k_input"


def _v_input(layer: int) -> str:
    return f"blocks.{layer}.hook_v_input"


def _mlp_in(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_in"


_INPUT_HOOK = {"q": _q_input, "k": _k_input, "v": _v_input}


# --------------------------------------------------------------------------------------------
# Pairs


@dataclass(frozen=True)
class PatchPair:
    """Clean and corrupted prompts of equal length; the last position predicts the answer.

    ``needle_span`` is ``[start, end)`` of the answer inside the context (where the two prompts
    differ), for ``positions="needle"``.
    """

    clean: Int[Tensor, " clean_pos"]
    corrupted: Int[Tensor, " corrupted_pos"]
    clean_answer: int
    corrupted_answer: int
    needle_span: tuple[int, int] | None = None

    def __post_init__(self):
        if self.clean.shape != self.corrupted.shape:
            raise PairError(
                f"clean prompt has {self.clean.shape[0]} tokens, corrupted "
                f"{self.corrupted.shape[0]}: patching needs equal lengths (use answers of equal "
                "token length)")
        if self.clean_answer == self.corrupted_answer:
            raise PairError(f"clean and corrupted answer are the same token {self.clean_answer}")
        if self.needle_span is not None:
            start, end = self.needle_span
            if not 0 <= start < end <= self.n_tokens:
                raise PairError(f"needle_span {self.needle_span} outside [0, {self.n_tokens})")

    @property
    def n_tokens(self) -> int:
        return int(self.clean.shape[0])


def make_pair(model: Model, needle: Needle, alternative: str, haystack: Haystack, *,
              context_length: int, depth: float | int, buffer: int = 200,
              answer_prefix: str = " ") -> PatchPair:
    """Clean prompt: ``needle``; corrupted: the same needle with its answer replaced by
    ``alternative``, in the same haystack at the same depth.  The answers (tokenized after
    ``answer_prefix``, as the model would emit them) must have equal token lengths and so must the
    prompts; their shared leading tokens are appended to both prompts."""
    start = needle.answer_start
    end = start + len(needle.answer)
    swapped = Needle(needle.needle[:start] + alternative + needle.needle[end:], needle.question,
                     alternative)
    ids_a = tokenize(model, answer_prefix + needle.answer, prepend_bos=False)
    ids_b = tokenize(model, answer_prefix + alternative, prepend_bos=False)
    if len(ids_a) != len(ids_b):
        raise PairError(f"answers {needle.answer!r} and {alternative!r} have {len(ids_a)} and "
                        f"{len(ids_b)} tokens; pick an alternative of equal token length")
    differ = (ids_a != ids_b).nonzero()
    if len(differ) == 0:
        raise PairError(f"answers {needle.answer!r} and {alternative!r} tokenize identically")
    k = int(differ[0, 0])
    trials = [build_trial(model, n, haystack, context_length=context_length, depth=depth,
                          buffer=buffer, max_new_tokens=len(ids_a)) for n in (needle, swapped)]
    clean, corrupted = trials
    if clean.n_tokens != corrupted.n_tokens or clean.answer_span != corrupted.answer_span:
        raise PairError(f"clean prompt has {clean.n_tokens} tokens (answer at "
                        f"{clean.answer_span}), corrupted {corrupted.n_tokens} (answer at "
                        f"{corrupted.answer_span}); pick an alternative of equal token length")
    prefix = ids_a[:k]
    return PatchPair(torch.cat([clean.tokens, prefix]), torch.cat([corrupted.tokens, prefix]),
                     int(ids_a[k]), int(ids_b[k]), clean.answer_span)


# --------------------------------------------------------------------------------------------
# Configuration, batches, metric


@dataclass(frozen=True)
class PatchConfig:
    """``positions``: where the patched heads' outputs are replaced: ``"answer"`` (the last
    position, which predicts the answer), ``"needle"`` (the answer inside the context),
    ``"all"``, or explicit positions (negative counts from the end)."""

    positions: PositionSpec = "answer"
    direction: Direction = "denoise"
    batch_size: int = 8

    def __post_init__(self):
        if self.direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {self.direction!r}")
        if isinstance(self.positions, str) and self.positions not in ("answer", "needle", "all"):
            raise ValueError(f"positions must be 'answer', 'needle', 'all' or a tuple of ints, "
                             f"got {self.positions!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        pos = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"positions": pos, "direction": self.direction, "batch_size": self.batch_size}



@dataclass(frozen=True)
class _Batch:
    index: list[int]
    base: Int[Tensor, "batch pos"]
    source: Int[Tensor, "batch pos"]
    clean_answer: Int[Tensor, " batch"]
    corrupted_answer: Int[Tensor, " batch"]
    positions: list[int]
    denoise: bool


def _positions(pair: PatchPair, spec: PositionSpec) -> list[int]:
    n = pair.n_tokens
    if spec == "answer":
        return [n - 1]
    if spec == "all":
        return list(range(n))
    if spec == "needle":
        if pair.needle_span is None:
            raise ValueError("positions='needle' needs pairs with a needle_span")
        return list(range(*pair.needle_span))
    bad = [p for p in spec if not -n <= p < n]
    if bad or not spec:
        raise ValueError(f"positions {list(spec)} out of range for a prompt of {n} tokens")
    return sorted({p % n for p in spec})


def _batches(model, pairs: Sequence[PatchPair], cfg: PatchConfig) -> list[_Batch]:
    """Pairs of equal length and patch positions, stacked ``cfg.batch_size`` at a time."""
    if not pairs:
        raise ValueError("no pairs to patch")
    groups: dict[tuple, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault((pair.n_tokens, tuple(_positions(pair, cfg.positions))), []).append(i)
    out, device, denoise = [], model.cfg.device, cfg.direction == "denoise"
    for (_, positions), members in groups.items():
        for at in range(0, len(members), cfg.batch_size):
            idx = members[at:at + cfg.batch_size]
            clean = torch.stack([pairs[i].clean for i in idx]).to(device)
            corrupted = torch.stack([pairs[i].corrupted for i in idx]).to(device)
            base, source = (corrupted, clean) if denoise else (clean, corrupted)
            answers = [torch.tensor([getattr(pairs[i], f) for i in idx], device=device)
                       for f in ("clean_answer", "corrupted_answer")]
            out.append(_Batch(idx, base, source, *answers, list(positions), denoise))
    return out


def _logit_diff(logits: Float[Tensor, "batch pos d_vocab"], batch: _Batch) -> np.ndarray:
    last = logits[:, -1].double()
    diff = (last.gather(-1, batch.clean_answer[:, None])
            - last.gather(-1, batch.corrupted_answer[:, None]))[:, 0]
    return diff.cpu().numpy()


def _run(model, tokens: Tensor, fwd: HookList) -> Tensor:
    with model.hooks(fwd_hooks=fwd):
        return model(tokens)


def _start(model, batch: _Batch, clean: np.ndarray, corrupted: np.ndarray,
           layers: Sequence[int]) -> dict[int, Tensor]:
    """Runs the source and base prompts: records the clean/corrupted metric of the batch's pairs
    and returns the source run's ``hook_z`` of ``layers``."""
    names = [hooks.z(lay) for lay in layers]
    logits, cache = model.run_with_cache(batch.source, names_filter=names)
    source, base = _logit_diff(logits, batch), _logit_diff(model(batch.base), batch)
    clean[batch.index], corrupted[batch.index] = (source, base) if batch.denoise else (base, source)
    return {layer: cache[hooks.z(layer)] for layer in layers}


def _scale(values: np.ndarray, clean: np.ndarray, corrupted: np.ndarray,
           zero: np.ndarray) -> np.ndarray:
    """``(mean(values) - mean(zero)) / (mean(clean) - mean(corrupted))``, means over pairs (axis
    0); NaN when the clean and corrupted runs do not differ."""
    gap = float(clean.mean() - corrupted.mean())
    if not np.isfinite(gap) or abs(gap) < 1e-9:
        return np.full(values.shape[1:], np.nan)
    return (values.mean(axis=0) - zero.mean()) / gap


class _Normalised:
    """Normalisations shared by the result classes (which hold the fields named here)."""

    clean_logit_diff: np.ndarray
    corrupted_logit_diff: np.ndarray
    config: PatchConfig

    @property
    def base_logit_diff(self) -> Float[np.ndarray, " n_pairs"]:
        """The unpatched run's metric: corrupted when denoising, clean when noising."""
        return self.corrupted_logit_diff if self.config.direction == "denoise" else (
            self.clean_logit_diff)

    @property
    def gap(self) -> float:
        """Mean clean minus mean corrupted logit difference (the unit of the normalisations)."""
        return float(self.clean_logit_diff.mean() - self.corrupted_logit_diff.mean())

    def _normalized(self, values: np.ndarray) -> np.ndarray:
        return _scale(values, self.clean_logit_diff, self.corrupted_logit_diff,
                      self.corrupted_logit_diff)

    def _effect(self, values: np.ndarray) -> np.ndarray:
        return _scale(values, self.clean_logit_diff, self.corrupted_logit_diff,
                      self.base_logit_diff)


# --------------------------------------------------------------------------------------------
# Activation patching


@dataclass(frozen=True)
class ActivationPatchingResult(_Normalised):
    """``logit_diff[pair, layer, head]``: the metric with that head's output patched."""

    logit_diff: Float[np.ndarray, "n_pairs n_layers n_heads"]
    clean_logit_diff: Float[np.ndarray, " n_pairs"]
    corrupted_logit_diff: Float[np.ndarray, " n_pairs"]
    config: PatchConfig

    @property
    def normalized(self) -> Float[np.ndarray, "n_layers n_heads"]:
        """0 = the corrupted run's logit difference, 1 = the clean run's."""
        return self._normalized(self.logit_diff)

    @property
    def effect(self) -> Float[np.ndarray, "n_layers n_heads"]:
        """Change from the unpatched run, in units of the clean - corrupted gap."""
        return self._effect(self.logit_diff)


def compute_activation_patching(model: Model, pairs: Sequence[PatchPair],
                                cfg: PatchConfig | None = None, *,
                                progress: bool = False) -> ActivationPatchingResult:
    """Patch each head's output, one head at a time, from the source run into the base run."""
    cfg = cfg or PatchConfig()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    clean, corrupted = np.zeros(len(pairs)), np.zeros(len(pairs))
    out = np.full((len(pairs), n_layers, n_heads), np.nan)
    batches = _batches(model, pairs, cfg)
    bar = tqdm(total=len(batches) * n_layers * n_heads, disable=not progress,
               desc="activation patching")
    with torch.no_grad():
        for batch in batches:
            source_z = _start(model, batch, clean, corrupted, range(n_layers))
            for layer in range(n_layers):
                for head in range(n_heads):
                    fwd = hooks.replace_output_hooks([(layer, head)], source_z,
                                                     positions=batch.positions)
                    out[batch.index, layer, head] = _logit_diff(_run(model, batch.base, fwd), batch)
                    bar.update()
    bar.close()
    return ActivationPatchingResult(out, clean, corrupted, cfg)


# --------------------------------------------------------------------------------------------
# Receivers and the path-patching hooks


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
        return f"L{self.layer}H{self.head}.{self.component}"

    def reads_layer(self, model) -> int:
        """The receiver reads what senders in layers below this one wrote."""
        cfg = model.cfg
        if self.component == "direct":
            return cfg.n_layers
        if self.component == "mlp":
            return self.layer if cfg.parallel_attn_mlp else self.layer + 1
        return self.layer


def head_receivers(heads: Sequence[Head], components: Sequence[str]) -> tuple[Receiver, ...]:
    """Receivers for ``components`` (``q``, ``k``, ``v``, ``direct``) of ``heads``: head by head,
    then ``direct`` once."""
    bad = [c for c in components if c not in (*HEAD_COMPONENTS, "direct")]
    if bad:
        raise ValueError(f"component must be q, k, v or direct, got {bad[0]!r}")
    out = [Receiver(c, layer, head) for layer, head in heads
           for c in HEAD_COMPONENTS if c in components]
    return tuple(dict.fromkeys(out + [Receiver("direct")] * ("direct" in components)))


def all_receivers(model: Model, senders: Sequence[Head]) -> tuple[Receiver, ...]:
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


def path_patching_hooks(model: Model, senders: Sequence[Head],
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
            fwd.append((_mlp_in(r.layer), lambda x, hook, u=upto: add(x, u, None)))
        else:
            fwd.append((hooks.resid_post(cfg.n_layers - 1),
                        lambda x, hook: add(x, cfg.n_layers, None)))
    for (comp, layer), heads in grouped.items():
        fwd.append((_INPUT_HOOK[comp](layer), lambda x, hook, u=layer, h=heads: add(x, u, h)))
    return fwd


# --------------------------------------------------------------------------------------------
# Path patching


def path_patch(model: Model, pairs: Sequence[PatchPair], senders: Sequence[Head],
               receivers: Sequence[Receiver], cfg: PatchConfig | None = None) -> np.ndarray:
    """The metric (logit difference per pair, ``[n_pairs]``) with the senders, jointly, patched
    along the paths that start with an edge into one of ``receivers``."""
    cfg = cfg or PatchConfig()
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
    return out


@dataclass(frozen=True)
class PathPatchingResult(_Normalised):
    """``logit_diff[pair, sender, receiver]``: the metric with one sender patched along its edge
    into one receiver (NaN where the receiver does not read the sender: same or earlier layer);
    ``total[pair, sender]``: the sender activation-patched (all paths)."""

    senders: tuple[Head, ...]
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
        return [f"L{layer}H{head}" for layer, head in self.senders]

    @property
    def receiver_labels(self) -> list[str]:
        return [r.label for r in self.receivers]


def compute_path_patching(model: Model, pairs: Sequence[PatchPair],
                          senders: Sequence[Head], receivers: Sequence[Receiver],
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
                fwd = hooks.replace_output_hooks([sender], source_z, positions=batch.positions)
                total[batch.index, i] = _logit_diff(_run(model, batch.base, fwd), batch)
                bar.update()
            for i, j in cells:
                fwd = path_patching_hooks(model, [senders[i]], [receivers[j]], source_z,
                                          positions=batch.positions)
                out[batch.index, i, j] = _logit_diff(_run(model, batch.base, fwd), batch)
                bar.update()
    bar.close()
    return PathPatchingResult(senders, receivers, out, total, clean, corrupted, cfg)


# --------------------------------------------------------------------------------------------
# Figures


def _effect_range(table: np.ndarray) -> float:
    finite = np.abs(table[np.isfinite(table)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def plot_activation_patching(result: ActivationPatchingResult, *,
                             title: str = "activation patching") -> go.Figure:
    """The per-head effect (units of the clean - corrupted gap), diverging about 0."""
    from rh_lens.plotting import plot_head_heatmap

    effect = result.effect
    return plot_head_heatmap(np.nan_to_num(effect), title=f"{title} ({result.config.direction})",
                             diverging=True, zmax=_effect_range(effect),
                             colorbar_title="effect")


def plot_path_patching(result: PathPatchingResult, *, title: str = "path patching") -> go.Figure:
    """Senders (y) x receivers (x) effect, with each sender's activation-patching total as the
    last column; blank cells: the receiver does not read the sender."""
    from rh_lens.plotting import DIVERGING

    table = np.concatenate([result.effect, result.total_effect[:, None]], axis=1)
    zmax = _effect_range(table)
    fig = go.Figure(go.Heatmap(
        z=table, x=[*result.receiver_labels, "all paths"], y=result.sender_labels,
        colorscale=DIVERGING, zmin=-zmax, zmax=zmax, zmid=0.0,
        colorbar=dict(title=dict(text="effect")),
        hovertemplate="%{y} -> %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_xaxes(title_text="receiver", type="category")
    fig.update_yaxes(title_text="sender", type="category", autorange="reversed")
    fig.update_layout(title=dict(text=f"{title} ({result.config.direction})"),
                      width=max(480, 28 * table.shape[1] + 260),
                      height=max(320, 28 * table.shape[0] + 200))
    return fig
