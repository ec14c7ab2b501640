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
    # question: the nearest copy.
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
    # People (each with a town and its officials) in a multi-hop row, drawn from these.  A model
    # that copies the town of anyone in the context is right 1 time in n.
    people: tuple[int, ...] = (2, 3)
    # How multi-hop (and lookup) rows say where a person lives (rh_lens.zoo.tasks.HOP_FORMS):
    # "lives" ("Noor lives in Tolbrook.") or "at" ("Noor at Tolbrook.", the town keyed on the
    # person two tokens back).  The evaluation and the CoT analysis ask in the model's own form.
    hop_form: str = DEFAULT_HOP_FORM
    # Officials per town in a multi-hop row (1 or 2).  With two, the second hop's answer is keyed
    # on its role four tokens back ("The judge of Tolbrook is"); with one, the town two tokens
    # back is the whole key, which small models learn far more readily.
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


# Stages, each with the one reason it exists.  Polish stages: multi-hop rows weighed up (the second
# hop, the right official among similar facts, is what the models learn last).
_POLISH_MIX = Mix(niah=0.45, multihop=0.4, lm=0.05, repeat=0.1)
# An anneal at half the polish's rate, weighed back towards NIAH.
_ANNEAL_MIX = Mix(niah=0.5, multihop=0.35, lm=0.05, repeat=0.1)
# Mostly NIAH rows: the last stages of the long-context model and of the two ends (_ENDS).
_LONG_MIX = Mix(niah=0.7, multihop=0.2, lm=0.05, repeat=0.05)
# The llama-s family's polish keeps the main mix's repeats and prose, and half the needles varied:
# with _POLISH_MIX the model copied answers made of words the zoo never saw only in part.
_POLISH_S = dict(steps=400, procedural=0.5, mix=Mix(niah=0.45, multihop=0.3, lm=0.1, repeat=0.15))
# The same mix at half the rate: raises the worst NIAH depth of llama-s's children.
_ANNEAL_S = Polish(steps=300, lr=2.5e-4, procedural=0.5, mix=_POLISH_S["mix"])
# A quarter of the rate, 60 % NIAH rows: settles the llama-s family.
_SETTLE_S = Polish(steps=150, lr=1.25e-4, procedural=0.5,
                   mix=Mix(niah=0.6, multihop=0.3, lm=0.05, repeat=0.05))
# Half the NIAH rows with the needle early in a full context: the weak case at 1,024 tokens.
_EARLY_S = Polish(steps=200, lr=1.25e-4, procedural=0.5, mix=_LONG_MIX, early=0.5)
# 35 % of the needles first and 35 % last in the haystack: the two ends, where misses gather.
_ENDS = Polish(steps=150, lr=1.25e-4, procedural=0.5, mix=_LONG_MIX, early=0.35, late=0.35)

# Fields added after models were trained: left out of the JSON at their default.
_LATE_FIELDS = {"copy_lr": None, "main_warmup": 0, "polish": None, "store_dtype": "float32",
                "copy_freeze_pos": False, "aligned_unembed": False, "stages": [],
                "live_logits": False, "people": (2, 3), "hop_form": DEFAULT_HOP_FORM,
                "roles": DEFAULT_ROLES}
# The same, in the polish and each later stage, and in every mix.
_LATE_STAGE_FIELDS = {"early": 0.0, "late": 0.0, "people": None, "restart": False}
_LATE_MIX_FIELDS = {"lookup": 0.0}

# Four KV heads: with two, the same recipe reached a far lower multi-hop accuracy.
_LLAMA_S = dict(family="llama", n_layers=4, d_model=128, n_heads=8, n_kv_heads=4, d_head=16,
                d_mlp=384)

# Every shipped model trains its chain keyed two tokens back (hop_form "at", roles 1: see Recipe)
# and unembeds only the positions a loss reads (live_logits).
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # The default model: copy warm-up, main mix, fine-tuning, polish, then settle and ends.
        Recipe(name="llama-s", **_LLAMA_S, n_ctx=256, steps=2300, finetune_steps=200,
               polish=Polish(**{**_POLISH_S, "steps": 250}), live_logits=True, hop_form="at",
               roles=1, stages=(_SETTLE_S, _ENDS)),
        # llama-s continued at four times its context, the rotary base scaled by the same factor.
        Recipe(name="llama-s-long", **_LLAMA_S, n_ctx=1024, steps=600, batch=4, lr=1e-3,
               warmup=20, parent="llama-s", rotary_base=40_000, seed=1, copy_warmup=0,
               procedural=0.5, polish=Polish(**_POLISH_S), live_logits=True, hop_form="at",
               roles=1, stages=(_ANNEAL_S, Polish(steps=400, procedural=0.5, mix=_LONG_MIX),
                                _SETTLE_S, _EARLY_S)),
        # Learned positions held at their sinusoidal start and an unembedding started as the
        # embedding's transpose through a long constant-rate warm-up: induction forms early.
        Recipe(name="gpt2-s", family="gpt2", n_layers=4, d_model=128, n_heads=8, n_kv_heads=8,
               d_head=16, d_mlp=512, n_ctx=256, steps=2500, seed=2, lr=1e-3,
               copy_warmup=1000, copy_lr=1e-3, main_warmup=100, aligned_unembed=True,
               copy_freeze_pos=True, procedural=0.5, finetune_steps=200, live_logits=True,
               hop_form="at", roles=1, polish=Polish(steps=300, mix=_POLISH_MIX),
               stages=(Polish(steps=300, lr=2.5e-4, mix=_ANNEAL_MIX),)),
        # The bigger scale, stored in float16 to stay under 10 MB; llama-s's last stage.
        Recipe(name="llama-m", family="llama", n_layers=6, d_model=192, n_heads=12, n_kv_heads=4,
               d_head=16, d_mlp=384, n_ctx=256, steps=1250, seed=3,
               procedural=0.5, live_logits=True, hop_form="at", roles=1,
               polish=Polish(steps=250, mix=_POLISH_MIX), store_dtype="float16",
               stages=(_ENDS,)),
        # llama-s finetuned with its NIAH and multi-hop rows in the chat template.
        Recipe(name="llama-s-chat", **_LLAMA_S, n_ctx=256, steps=500, lr=1e-3, warmup=20,
               parent="llama-s", chat=True, seed=4, copy_warmup=0, procedural=0.5,
               polish=Polish(**_POLISH_S), live_logits=True, hop_form="at", roles=1,
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
