"""The zoo's recipes: model shape, data mix, steps and seed of every bundled model.

A recipe is all that ``python -m rh_lens.zoo.training.train NAME`` needs; changing one changes
the model, so the model card records the recipe it was trained with.
"""

import dataclasses
from dataclasses import dataclass, field

from rh_lens.zoo.tasks import DEFAULT_HOP_FORM, DEFAULT_ROLES, HOP_FORMS


@dataclass(frozen=True)
class Mix:
    """Share of each row type in the main batch (normalised when sampled)."""

    niah: float = 0.5
    multihop: float = 0.25
    lm: float = 0.1
    repeat: float = 0.15  # a random token sequence and its repetition: teaches copying
    # Where 3-6 people live, asked of all at once (tasks.lookup_example): the multi-hop's first
    # hop, several times a row.  Drawn after the others, so at 0 no batch changes.
    lookup: float = 0.0


def _check_people(owner: str, people: tuple[int, ...] | None) -> None:
    if people is not None and (not people or min(people) < 2 or max(people) > 6):
        raise ValueError(f"{owner}.people are counts from 2 to 6, got {people}")


@dataclass(frozen=True)
class Polish:
    """A stage after the fine-tuning one (the polish, and each of ``Recipe.stages``), at the
    constant rate ``lr`` with its own ``mix``; a share ``procedural`` of its NIAH needles comes
    from :func:`rh_lens.zoo.tasks.varied_template` (subjects built from random words: the question
    matches its needle only by the words they share), which is what carries the rule over to the
    held-out templates."""

    steps: int
    lr: float = 5e-4
    procedural: float = 0.7
    mix: Mix = field(default_factory=Mix)
    # Share of the NIAH rows whose haystack is the longest that fits, with the needle in its first
    # fifth: the farthest copy, the weak case of a model at an extended context.
    early: float = 0.0
    # Share of the NIAH rows with the needle in the last fifth of their haystack, just before the
    # question: the nearest copy, where llama-m's answers drifted off the needle midway.
    late: float = 0.0
    people: tuple[int, ...] | None = None  # as Recipe.people (None: the recipe's)
    # Start the stage from the weights as the run writes them (in ``Recipe.store_dtype``) with a
    # fresh AdamW: a model written at the stage's first step is then as good as a checkpoint
    # (``train --start-from``), so a stage can be added to a shipped model whose run's checkpoint
    # is gone, and a rerun from scratch still does exactly what was done.
    restart: bool = False

    def __post_init__(self) -> None:
        _check_people("Polish", self.people)
        shares = {"procedural": self.procedural, "early": self.early, "late": self.late}
        for key, val in shares.items():
            if not 0.0 <= val <= 1.0:
                raise ValueError(f"Polish.{key} is a share in [0, 1], got {val}")
        if self.early + self.late > 1.0:
            raise ValueError("Polish.early + Polish.late is at most 1, got "
                             f"{self.early + self.late}")


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str  # "llama" or "gpt2"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    steps: int
    batch: int = 16
    param_batch: int = 16  # short rows of parametric facts per step
    lr: float = 3e-3
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.05
    answer_weight: float = 2.0  # weight of the answer-token loss next to the LM loss
    rotary_base: int = 10_000
    min_haystack: int = 16  # shortest haystack in tokens (lengths vary up to the context)
    mix: Mix = field(default_factory=Mix)
    copy_warmup: int = 800  # first steps train induction only (see rh_lens.zoo.training.data)
    copy_batch: int = 64
    copy_lr: float | None = None  # a constant rate for the copy warm-up (None: the cosine's)
    main_warmup: int = 0  # with copy_lr: the main stage's rate ramps up over these steps
    # Learned positions (GPT-2 family): keep them at their sinusoidal start during the warm-up.
    copy_freeze_pos: bool = False
    # Start the unembedding as the embedding's transpose (GPT-2 ties the two): copying a token
    # is then an identity-like OV circuit from the first step.
    aligned_unembed: bool = False
    procedural: float = 0.0  # share of NIAH needles from procedural templates (main stage)
    finetune_steps: int = 0  # a last stage at a constant learning rate, after ``steps``
    finetune_lr: float = 5e-4
    finetune_procedural: float = 0.5
    polish: Polish | None = None  # a last stage (see Polish)
    # Further stages of the same kind after the polish, in order.  Appending one extends a
    # finished run: its checkpoint resumes (the steps before are unchanged, see train.extends).
    stages: tuple[Polish, ...] = ()
    store_dtype: str = "float32"  # dtype of the written weights ("float16" keeps a model <10 MB)
    seed: int = 0
    parent: str | None = None  # continue from this zoo model's weights
    chat: bool = False  # wrap NIAH / multi-hop rows in the chat template
    tokenizer_seed: int = 0
    vocab_size: int = 2048
    # Unembed only the positions a loss reads (no padding, no unscored prompt tokens): the same
    # loss, 20-30 % less time a step, other float sums (so a recipe's bits depend on it).
    live_logits: bool = False
    # People (each with a town and two officials) in a multi-hop row, drawn from these.  A model
    # that copies the town after any "lives in", whoever lives there, is right 1 time in n: with
    # two people, half the time, which is where several runs' first hop stayed.
    people: tuple[int, ...] = (2, 3)
    # How multi-hop (and lookup) rows say where a person lives (rh_lens.zoo.tasks.HOP_FORMS):
    # "lives" ("Noor lives in Tolbrook.") or "at" ("Noor at Tolbrook.", the town keyed on the
    # person two tokens back).  The evaluation and the CoT analysis ask in the model's own form.
    hop_form: str = DEFAULT_HOP_FORM
    # Officials per town in a multi-hop row (1 or 2).  With two, the second hop's answer is keyed
    # on its role four tokens back ("The judge of Tolbrook is"), which on one machine's runs
    # formed only half the time (the town's other official, right 1 time in 2); with one, the
    # town two tokens back is the whole key.
    roles: int = DEFAULT_ROLES

    def __post_init__(self) -> None:
        _check_people("Recipe", self.people)
        if self.roles not in (1, 2):
            raise ValueError(f"Recipe.roles is 1 or 2 officials per town, got {self.roles}")
        if self.hop_form not in HOP_FORMS:
            raise ValueError(f"Recipe.hop_form is one of {', '.join(HOP_FORMS)}, "
                             f"got {self.hop_form!r}")

    @property
    def polish_start(self) -> int:
        return self.steps + self.finetune_steps

    @property
    def total_steps(self) -> int:
        return self.polish_start + sum(st.steps for _, st in self.late_stages())

    def late_stages(self) -> list[tuple[int, Polish]]:
        """(first step, stage) of the polish and of each stage after it, in order."""
        out, start = [], self.polish_start
        for st in ((self.polish,) if self.polish else ()) + tuple(self.stages):
            out.append((start, st))
            start += st.steps
        return out

    def restarts(self) -> list[int]:
        """First steps of the stages that start afresh from the stored weights (``restart``)."""
        return [start for start, st in self.late_stages() if st.restart]

    def stage_at(self, step: int) -> Polish | None:
        """The polish-like stage that ``step`` belongs to (None before the polish)."""
        for start, st in self.late_stages():
            if start <= step < start + st.steps:
                return st
        return None

    def hooked_config(self):
        """The ``HookedTransformerConfig`` of this recipe's model."""
        from transformer_lens import HookedTransformerConfig

        common = dict(
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            d_head=self.d_head, d_mlp=self.d_mlp, n_ctx=self.n_ctx, d_vocab=self.vocab_size,
            model_name=f"zoo-{self.name}", seed=self.seed, default_prepend_bos=True,
        )
        if self.family == "llama":
            return HookedTransformerConfig(
                **common, n_key_value_heads=self.n_kv_heads, act_fn="silu", gated_mlp=True,
                normalization_type="RMS", positional_embedding_type="rotary",
                rotary_dim=self.d_head, rotary_base=self.rotary_base, final_rms=True,
                original_architecture="LlamaForCausalLM",
            )
        if self.family == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise ValueError("gpt2-family recipes use multi-head attention")
            return HookedTransformerConfig(
                **common, act_fn="gelu", normalization_type="LN",
                positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
            )
        raise ValueError(f"unknown family {self.family!r}")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["stages"] = list(out["stages"])  # as JSON reads it back
        for mix in [out["mix"]] + [st["mix"] for st in out["stages"] + [out["polish"]] if st]:
            for late, default in _LATE_MIX_FIELDS.items():
                if mix[late] == default:
                    del mix[late]
        for stage in out["stages"] + [out["polish"]]:
            for late, default in _LATE_STAGE_FIELDS.items():
                if stage is not None and stage[late] == default:
                    del stage[late]
            if stage is not None and "people" in stage:
                stage["people"] = list(stage["people"])  # as JSON reads it back
        for late, default in _LATE_FIELDS.items():  # older cards and checkpoints still match
            if out[late] == default:
                del out[late]
        if "people" in out:
            out["people"] = list(out["people"])
        return out


# The polish stages weigh multi-hop rows up: their second hop (the right official among six
# similar facts) is what the models learn last.
_POLISH_MIX = Mix(niah=0.45, multihop=0.4, lm=0.05, repeat=0.1)
# A last stage at half the polish's rate, weighed back towards NIAH.
_ANNEAL_MIX = Mix(niah=0.5, multihop=0.35, lm=0.05, repeat=0.1)
# llama-s-long's last stage: mostly NIAH rows.
_LONG_MIX = Mix(niah=0.7, multihop=0.2, lm=0.05, repeat=0.05)
# llama-s and its children keep the main mix's repeats and prose: with _POLISH_MIX (800 steps,
# 70 % varied needles) llama-s copied answers of words the zoo never saw ("purple ginger and sea
# salt") only in part, 2 of 12 detection trials against 9 before the polish; with this mix and
# half the needles varied, 8 of 12, at the same held-out NIAH (0.95).
_POLISH_S = dict(steps=400, procedural=0.5, mix=Mix(niah=0.45, multihop=0.3, lm=0.1, repeat=0.15))
# Then 300 steps at half the rate, same mix.  On the two-KV llama-s: worst NIAH depth 0.70 -> 0.80
# (dev trials 113 -> 117 of 120; answers of unseen words 8 -> 10 of 12 detection trials); on the
# four-KV one it lowered both NIAH and multi-hop, so only the children keep it.
_ANNEAL_S = Polish(steps=300, lr=2.5e-4, procedural=0.5, mix=_POLISH_S["mix"])
# 150 steps at a quarter of the rate with 60 % NIAH rows (the llama-s family).
_SETTLE_S = Polish(steps=150, lr=1.25e-4, procedural=0.5,
                   mix=Mix(niah=0.6, multihop=0.3, lm=0.05, repeat=0.05))
# 200 steps at _SETTLE_S's rate, half the NIAH rows with the needle early in a full context
# (llama-s-long, and the llama-m before today's, whose misses were that case).
_EARLY_S = Polish(steps=200, lr=1.25e-4, procedural=0.5, mix=_LONG_MIX, early=0.5)
# The last stage of llama-s and llama-m: 150 steps at _SETTLE_S's rate of 70 % NIAH rows, 35 % of
# their needles first in the haystack and 35 % last (the two ends, where misses gather).
_ENDS = Polish(steps=150, lr=1.25e-4, procedural=0.5, mix=_LONG_MIX, early=0.35, late=0.35)
# Fields added after models were trained: left out of the JSON at their default.
_LATE_FIELDS = {"copy_lr": None, "main_warmup": 0, "polish": None, "store_dtype": "float32",
                "copy_freeze_pos": False, "aligned_unembed": False, "stages": [],
                "live_logits": False, "people": (2, 3), "hop_form": DEFAULT_HOP_FORM,
                "roles": DEFAULT_ROLES}
# The same, in the polish and each later stage, and in every mix.
_LATE_STAGE_FIELDS = {"early": 0.0, "late": 0.0, "people": None, "restart": False}
_LATE_MIX_FIELDS = {"lookup": 0.0}

# Four KV heads (the issue allows two to four): with two, the same recipe (plus _ANNEAL_S) reached
# held-out NIAH worst depth 0.80 (mean 0.95) and multi-hop 0.12; with four, and no anneal, 0.90
# (0.97) and 0.42 after the polish.  _ANNEAL_S after the four-KV polish lowered both (0.85 / 0.96,
# 0.27); the stages below keep more multi-hop rows.
_LLAMA_S = dict(family="llama", n_layers=4, d_model=128, n_heads=8, n_kv_heads=4, d_head=16,
                d_mlp=384)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="llama-s", **_LLAMA_S, n_ctx=256, steps=2300, finetune_steps=200,
               polish=Polish(**{**_POLISH_S, "steps": 250}), live_logits=True, hop_form="at",
               roles=1,
               # Multi-hop rows say "Noor at Tolbrook." with one official a town, so both hops
               # are keyed two tokens back.  The recipe before (steps 3,000, fine-tuning 500,
               # polish 400, then 400 steps of 45 % multi-hop rows, 300 of _ANNEAL_MIX at 2.5e-4 and
               # _SETTLE_S; "lives in", two officials a town) met every target on the first
               # machine, 43.4 min by bench_train; on the AMD EPYC it took 56.1, and with live
               # logits and 2,500 steps its first hop copied another person's town (multi-hop
               # 0.10; 0.20-0.35 with lookup rows at 5e-4 late or 15 % in the whole run).
               # The hop key three tokens back ("Noor lives in") is what these runs did not
               # learn.  With hop_form "at" alone (two runs at one thread each), this recipe
               # without its last stage: worst held-out NIAH depth 0.85 (mean 0.95), multi-hop
               # 0.52, the second hop the other official of the right town; with roles 1 as well:
               # 0.85 (0.96), multi-hop 0.95; with the last stage (this recipe): 0.94 (0.98),
               # multi-hop 0.93, 26.0-29.9 min by bench_train on the AMD EPYC.  _EARLY_S as the last
               # stage instead: 0.93 (0.98), 0.93.
               stages=(_SETTLE_S, _ENDS)),
        Recipe(name="llama-s-long", **_LLAMA_S, n_ctx=1024, steps=600, batch=4, lr=1e-3,
               warmup=20, parent="llama-s", rotary_base=40_000, seed=1, copy_warmup=0,
               procedural=0.5, polish=Polish(**_POLISH_S), live_logits=True, hop_form="at",
               roles=1,
               # From the parent with hop_form "at" and roles 1, with them and live logits, and
               # the stages of the earlier recipe (below): 2,750 steps, 0.96 (0.99), multi-hop
               # 0.97; 35.4-35.8 min by bench_train on the AMD EPYC.  Without its second 400-step
               # and its 300-step _LONG_MIX stages (this recipe, 2,050 steps, trained alone in
               # 27.3 min at two threads, 24.1 by bench_train): 0.96 (0.99), multi-hop 0.95; 13
               # of 300 detection trials missed, against 2 (one needle, "jar 3449" -> "jar 344").
               # Then mostly NIAH rows at the polish's rate, and at half of it.  From the two-KV
               # parent: worst depth at 1,024 tokens 0.50 -> 0.70 after the first 400 steps
               # (mean 0.82 -> 0.92), 0.75 (mean 0.95) at the end.  From the four-KV one with
               # multi-hop 0.42: 0.65 (0.91), multi-hop 0.38; from the earlier parent (0.92):
               # 0.65 (0.93), 0.75, and after _SETTLE_S 0.70 (0.95), 0.78, all with the parent's
               # rotary base (10,000): the needle in the first ~100 of 1,024 tokens was the weak
               # part, the copy starting and then drifting.  With the base at 40,000 (the parent's
               # times the context's growth) and nothing else changed: 0.85 (0.98), 0.95, the
               # misses answers cut short (" heron 3932" for "heron 3932 ivory") with the needle
               # in the first fifth of a full context.  Then 200 steps at _SETTLE_S's rate with
               # half the NIAH rows that case (``early``): 0.95 (0.99), 0.95; dev trials 114 ->
               # 119 of 120.  300 steps of 60 % NIAH rows at 2.5e-4 instead: 0.85 (0.97), 0.92.
               # The earlier recipe's two 400-step stages were written as they were run (one of
               # 800 has the same batches).  With live logits (27.5 min by bench_train, from
               # 31.4): 0.85 (0.96), worst at depth 1.0, multi-hop 0.95; not shipped.
               stages=(_ANNEAL_S, Polish(steps=400, procedural=0.5, mix=_LONG_MIX), _SETTLE_S,
                       _EARLY_S)),
        # Learned positions.  With an unembedding started as the embedding's transpose and the
        # positions held at their sinusoidal start, the warm-up's repeat loss is 3.5 nats at step
        # 600 (log vocab = 7.6); without, its plateau lasted 1,500-2,600 steps (at 3e-3: longer).
        # That copying works only in the warm-up's layout (a repeat after 30 random tokens: 10
        # nats); the main mix generalises it.  Rows started at random position ids, or after a
        # random prefix, did not leave the plateau faster (see the README).
        Recipe(name="gpt2-s", family="gpt2", n_layers=4, d_model=128, n_heads=8, n_kv_heads=8,
               d_head=16, d_mlp=512, n_ctx=256, steps=2500, seed=2, lr=1e-3,
               copy_warmup=1000, copy_lr=1e-3, main_warmup=100, aligned_unembed=True,
               copy_freeze_pos=True, procedural=0.5, finetune_steps=200, live_logits=True,
               hop_form="at", roles=1, polish=Polish(steps=300, mix=_POLISH_MIX),
               # With "lives in" and two officials a town (steps 2,700, fine-tuning 300): the
               # polish continued (it was first shipped after 300 steps: multi-hop 0.70, worst
               # NIAH depth 0.85) for 500 steps, then 300 at half its rate: 0.92 and 0.90.
               # Retrained with live logits: 29.2 min alone at two threads (~40 before), held-out
               # NIAH 0.95 (mean 0.99) at 20 trials a depth, 0.96 (0.98) at 80, multi-hop 0.87;
               # 33.5-35.2 min by bench_train on the AMD EPYC.  Keyed two tokens back (hop_form
               # "at", roles 1, as llama-s), without the continued polish and with 200 fewer
               # main and 100 fewer fine-tuning steps (3,300 from 4,100; this recipe, at one
               # thread beside another run): 0.93 (0.96), multi-hop 0.88.
               stages=(Polish(steps=300, lr=2.5e-4, mix=_ANNEAL_MIX),)),
        Recipe(name="llama-m", family="llama", n_layers=6, d_model=192, n_heads=12, n_kv_heads=4,
               d_head=16, d_mlp=384, n_ctx=256, steps=1250, seed=3,
               procedural=0.5, live_logits=True, hop_form="at", roles=1,
               polish=Polish(steps=250, mix=_POLISH_MIX), store_dtype="float16",
               # Keyed two tokens back (hop_form "at", roles 1, as llama-s), with llama-s's last
               # stage: 1,650 steps, 25.7 min alone at two threads (25.8-32.4 by bench_train),
               # held-out NIAH 0.91 (mean 0.96), multi-hop 0.87; the same weights bit for bit at
               # one thread.  The recipe before (2,350 steps, "lives in", two officials a town,
               # 38.4-44.1 min by bench_train on the AMD EPYC; its history is in NOTES.md) met
               # every target only after a last stage added to its float16 weights.
               stages=(_ENDS,)),
        Recipe(name="llama-s-chat", **_LLAMA_S, n_ctx=256, steps=500, lr=1e-3, warmup=20,
               parent="llama-s", chat=True, seed=4, copy_warmup=0, procedural=0.5,
               polish=Polish(**_POLISH_S), live_logits=True, hop_form="at", roles=1,
               # From the parent with hop_form "at" and roles 1, with them and live logits:
               # 0.91 (0.96), multi-hop 0.90.  From the earlier multi-hop llama-s, after
               # _ANNEAL_S: worst NIAH depth 0.80 (mean 0.96), multi-hop 0.87; after _SETTLE_S
               # 0.95 (0.99) and 0.90.
               stages=(_ANNEAL_S, _SETTLE_S)),
        # A micro recipe for smoke tests: trains a few steps in seconds.
        Recipe(name="micro", family="llama", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2,
               d_head=8, d_mlp=64, n_ctx=128, steps=4, batch=2, param_batch=2, warmup=1,
               vocab_size=512, copy_warmup=2, copy_batch=2),
    )
}
ZOO_NAMES = ("llama-s", "llama-s-long", "gpt2-s", "llama-m", "llama-s-chat")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown zoo recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
