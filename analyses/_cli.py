"""What the analysis scripts share: their option blocks, loading a model and the NIAH inputs
from those options, the ranking scores, the bad-input guard of ``main`` and default run
directories.

Each ``add_*_args(parser, ...)`` defines one block of options; where scripts differ in a default
or a help text it is a keyword.  The library core never reads these options: it takes the
objects built here.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "zoo:llama-s"
NEEDLE_ROOM = 48  # tokens beyond the buffer at the shortest default length, at least ...
HAYSTACK_ROOM = 16  # ... the longest needle plus this much haystack
QUESTION_SLACK = 4  # tokens of the default buffer beyond the question and the new tokens
MODES = {  # masking mode -> what it does, for --mode's help
    "uniform": "the paper's zero query",
    "zero": "head output 0",
    "mean": "head output set to its mean over reference prompts",
    "resample": "head output taken from another prompt",
}


# ------------------------------------------------------------------------------------ options


def add_model_args(parser: argparse.ArgumentParser, *, device: str | None = None,
                   loading: bool = True) -> None:
    """``--model``, the backend options, ``--device`` and, with ``loading``, ``--dtype`` and
    ``--n-ctx`` (what :func:`load_model` reads)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (see rh_lens.models)")
    add_backend_args(parser)
    parser.add_argument("--device", default=device,
                        help=f'"cpu", "cuda" or "auto" (default {device or "cpu"})')
    if loading:
        parser.add_argument("--dtype", default=None,
                            help="float32 (default), bfloat16, float16")
        parser.add_argument("--n-ctx", type=int, default=None,
                            help="extend a rotary model's context")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--no-fast-prefill``: which engine runs the model (rh_lens.models)."""
    from rh_lens.models import BACKENDS, DEFAULT_BACKEND

    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="hooked: HookedTransformer (transformer-lens 3.x); bridge: "
                             f"TransformerBridge around the Hugging Face model (default "
                             f"{DEFAULT_BACKEND})")
    parser.add_argument("--no-fast-prefill", action="store_true",
                        help="bridge: fill the key/value cache eagerly, not with SDPA")


def add_run_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """``--out`` (a directory) and ``--quiet``."""
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_figure_args(parser)


def add_figure_args(parser: argparse.ArgumentParser) -> None:
    """``--self-contained-figures`` (see :func:`save_figures`)."""
    parser.add_argument("--self-contained-figures", action="store_true",
                        help="embed plotly in every figure (4.8 MB each) instead of one shared "
                        "plotly.min.js in the output folder")


def add_sweep_args(parser: argparse.ArgumentParser, *, points: int,
                   needle_seed: str = "--seed") -> None:
    """The NIAH sweep (see :func:`sweep_config`) and its inputs (see :func:`niah_inputs`);
    ``needle_seed`` names the option that seeds the zoo's needles."""
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths in tokens "
                        f"(default: {points} lengths up to the model's n_ctx)")
    parser.add_argument("--depths", type=float, nargs="+", help="needle depths in percent "
                        f"(default: {points} depths from 0 to 100)")
    parser.add_argument("--needles", type=Path,
                        help="needles.jsonl (needle, question, real_needle)")
    parser.add_argument("--haystack", type=Path, help="folder of .txt files, or one subfolder "
                        "per needle (the reference layout); default: the zoo prose generator")
    parser.add_argument("--n-needles", type=int, default=3,
                        help="zoo needles when --needles is unset")
    parser.add_argument(needle_seed, type=int, default=0,
                        help="seed of the zoo needles and haystacks")
    parser.add_argument("--buffer", type=int, help="tokens kept for question and answer (plus "
                        "the chat template's tokens with --chat) (default min(200, n_ctx/4), "
                        "or the longest question plus --max-new-tokens when more)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="decoding cap (default min(50, n_ctx/8))")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size in tokens")
    parser.add_argument("--batch", type=int, default=1, help="trials decoded together "
                        "(left-padded; each gives exactly its unbatched results)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    parser.add_argument("--recompute-bad-cells", action="store_true",
                        help="compute again the stored cells that cannot be read (a truncated "
                        "file), instead of stopping at the first")


def add_scores_args(parser: argparse.ArgumentParser, *, scores_help: str,
                    threshold: bool = True) -> None:
    """``--scores`` (read by :func:`load_scores`), ``--score`` and, with ``threshold``,
    ``--threshold`` (retrieval heads are never drawn for random-K)."""
    from rh_lens.heads import THRESHOLD

    parser.add_argument("--scores", type=Path, help=scores_help)
    parser.add_argument("--score", choices=("step", "set", "mass", "qr"), default="step",
                        help="which score of a detection directory ranks the heads (mass and "
                        "qr: when detection ran them)")
    parser.add_argument("--scores-from-other-model", action="store_true",
                        help="accept a detection directory computed on another model than "
                        "--model (refused by default; reference-format files name no model)")
    if threshold:
        parser.add_argument("--threshold", type=float, default=THRESHOLD,
                            help="retrieval heads (score > this) are never drawn for random-K")


def add_mask_args(parser: argparse.ArgumentParser, *, modes: tuple[str, ...], draws: int,
                  ks_help: str, mask_help: str) -> None:
    """The head sets masked (``--mask``, ``--ks``, ``--draws``, ``--seed``) and how
    (``--mode``, ``--positions``)."""
    from rh_lens.heads import SPEC_HELP

    parser.add_argument("--mask", action="append", default=[], metavar="SPEC",
                        help=mask_help.format(spec=SPEC_HELP))
    parser.add_argument("--ks", type=int, nargs="+", help=ks_help)
    parser.add_argument("--controls", nargs="+", choices=("random", "matched", "bottom"),
                        default=["random"], metavar="KIND",
                        help="control head sets run beside top:K for each --ks K: random "
                        "(non-retrieval heads), matched (the top-K layer histogram, disjoint "
                        "from top-K), bottom (the K lowest scores) (default random)")
    parser.add_argument("--draws", type=positive_int("--draws"), default=draws,
                        help="seeded draws per random:K and matched:K")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random-K and matched-K draws")
    parser.add_argument("--mode", choices=modes, default=modes[0],
                        help="; ".join(f"{m}: {MODES[m]}" for m in modes))
    parser.add_argument("--positions", choices=("decode", "all"), default="decode",
                        help="decode: only steps that predict a token (the paper); all: "
                        "prefill too")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return index, count


# Launch options a job must not see again (name -> number of values); see worker_argv.
_LAUNCH_OPTIONS = {"--launcher": 1, "--jobs": 1, "--executor-config": 1, "--ray-address": 1,
                   "--dry-run": 0}


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """Where a sweep runs (:mod:`rh_lens.launch`): ``--launcher``, ``--jobs``,
    ``--executor-config``, ``--ray-address``, ``--dry-run``, and ``--shard`` (one part here)."""
    from rh_lens.launch import LAUNCHERS

    g = parser.add_argument_group("launch", "run the sweep's shards as Slurm or Ray jobs "
                                  "(docs/cluster.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: this process (default); submitit: a Slurm job array; ray: one "
                   "Ray task per shard")
    g.add_argument("--jobs", type=int, default=1, help="shards, one job each")
    g.add_argument("--executor-config", type=Path, metavar="FILE.toml",
                   help="resources of each job: partition, account, qos, constraint, "
                   "cpus_per_task, gpus_per_task, mem_gb, timeout_min, array_parallelism, setup")
    g.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="the Ray cluster (default: start one on this machine)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (cells, shards, jobs, resources); submit nothing")
    g.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="run only part I of N of the sweep's cells here")


def positive_int(option: str):
    """An argparse ``type`` for ``option``: an integer >= 1, else a clear error naming it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be >= 1, got {value}")
        return value

    return parse


def control_masks(ks, controls) -> list[str]:
    """``top:K`` and each control ``KIND:K`` for every K of ``ks``, top first."""
    return [f"{kind}:{k}" for kind in ("top", *controls) for k in ks]


def feasible_ks(ks, controls, facts, table, *, threshold: float, exclude=()) -> list[int]:
    """The K of ``ks`` for which top:K and every control kind can be drawn on this model (the
    default curves stop where a control runs out of heads)."""
    from rh_lens.heads import select_heads

    def ok(k: int) -> bool:
        try:
            for kind in ("top", *controls):
                select_heads(f"{kind}:{k}", n_layers=facts.n_layers, n_heads=facts.n_heads,
                             scores=table, threshold=threshold, exclude=exclude)
        except ValueError:
            return False
        return True

    return [k for k in ks if ok(k)]


# ------------------------------------------------------------------------- what they build


def backend_kwargs(args: argparse.Namespace) -> dict:
    """The ``load_model`` keywords of :func:`add_backend_args`'s options."""
    if args.backend == "hooked":
        return {"backend": "hooked"}
    return {"backend": "bridge", "fast_prefill": False if args.no_fast_prefill else None}


def load_model(args: argparse.Namespace):
    """The model of :func:`add_model_args`'s options."""
    from rh_lens import models

    return models.load_model(args.model, device=args.device, dtype=getattr(args, "dtype", None),
                             n_ctx=getattr(args, "n_ctx", None), **backend_kwargs(args))


def metadata(args: argparse.Namespace, model, argv):
    """The provenance of a run of ``model`` (``args.seed`` is its seed)."""
    from rh_lens.results import RunMetadata

    return RunMetadata.collect(model_spec=args.model, model=model, seed=args.seed, argv=argv)


def sweep_buffer(model, args: argparse.Namespace, n_ctx: int, *,
                 needles: Sequence = ()) -> tuple[int, int]:
    """The sweep's ``(buffer, max_new_tokens)`` where ``--buffer`` / ``--max-new-tokens`` are not
    given: a quarter of the context (at most 200) for question and answer, and at least the
    longest question of ``needles`` (:func:`question_room`) plus the new tokens, plus the chat
    template's own tokens with ``--chat``; decoding up to an eighth of the context (at most 50)."""
    base = min(200, n_ctx // 4)
    max_new = (args.max_new_tokens if args.max_new_tokens is not None
               else max(1, min(50, base // 2)))
    buffer = args.buffer
    if buffer is None:
        from rh_lens.niah import chat_overhead

        buffer = (max(base, question_room(model, needles) + max_new)
                  + (chat_overhead(model) if args.chat else 0))
    return buffer, max_new


def question_room(model, needles: Sequence) -> int:
    """Tokens a prompt spends after its context, for the longest question of ``needles``: the
    paper's ``Based on the content of the book, Question: ...\nAnswer:``, a BOS and
    :data:`QUESTION_SLACK` tokens for merges where the context meets it (0 without needles)."""
    from rh_lens.models import tokenize
    from rh_lens.niah import BASE_TEMPLATE

    if not needles:
        return 0
    longest = max(len(tokenize(model, BASE_TEMPLATE.format(context="", question=n.question),
                               prepend_bos=False)) for n in needles)
    return 1 + longest + QUESTION_SLACK


def shortest_length(model, needles: Sequence, *, buffer: int, n_ctx: int) -> int:
    """The shortest default context length: an eighth of the context, and at least ``buffer``
    plus the longest needle's tokens and :data:`HAYSTACK_ROOM` tokens of haystack (``buffer``
    plus :data:`NEEDLE_ROOM` whatever the needles)."""
    from rh_lens.models import tokenize

    longest = max((len(tokenize(model, " " + n.needle, prepend_bos=False)) for n in needles),
                  default=0)
    shortest = max(buffer + max(NEEDLE_ROOM, longest + HAYSTACK_ROOM), n_ctx // 8)
    if shortest > n_ctx:
        raise ValueError(
            f"the longest needle takes {longest} tokens: with a buffer of {buffer} tokens the "
            f"shortest context length would be {shortest}, beyond n_ctx={n_ctx}; give "
            "--lengths, a smaller --buffer or shorter needles")
    return shortest


def sweep_config(model, args: argparse.Namespace, *, points: int, needles: Sequence):
    """The ``DetectConfig`` of :func:`add_sweep_args`'s options; unset lengths and depths are
    ``points`` values spread up to the context (from :func:`shortest_length`, which makes room
    for the longest of ``needles``) and from 0 to 100 %."""
    import numpy as np

    from rh_lens.detect import DetectConfig

    n_ctx = model.cfg.n_ctx
    buffer, max_new = sweep_buffer(model, args, n_ctx, needles=needles)
    lengths = args.lengths or sorted({int(x) for x in np.linspace(
        shortest_length(model, needles, buffer=buffer, n_ctx=n_ctx), n_ctx, points)})
    protocol = getattr(args, "protocol", "paper")
    depths = args.depths or np.linspace(0, 100, points)
    if protocol == "reference" and not args.depths:  # the reference rounds its depths
        depths = np.round(depths)
    return DetectConfig(lengths=tuple(lengths), depths=tuple(float(d) for d in depths),
                        buffer=buffer, max_new_tokens=max_new, chunk_size=args.chunk,
                        chat=args.chat, batch_size=args.batch, protocol=protocol)


def launch_settings(args: argparse.Namespace):
    """The :class:`~rh_lens.launch.LaunchSettings` of :func:`add_launch_args`'s options,
    checked (executor file, a reachable engine) before anything is loaded or submitted."""
    from rh_lens.launch import LaunchSettings, read_executor_config
    from rh_lens.launch.backends import check_engine

    executor = {}
    if args.executor_config is not None:
        if args.launcher == "local":
            raise ValueError("--executor-config needs --launcher submitit or ray")
        executor = read_executor_config(args.executor_config, args.launcher)
    settings = LaunchSettings(args.launcher, args.jobs, executor, args.ray_address,
                              args.dry_run)
    if settings.launcher != "local":
        if args.shard != (0, 1):
            raise ValueError(f"--shard with --launcher {args.launcher}: the launcher shards "
                             "the sweep itself (--jobs)")
        check_engine(settings)
    return settings


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without the launch options, for the jobs (they add their own)."""
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        name = token.split("=", 1)[0]
        if name in _LAUNCH_OPTIONS:
            skip = 0 if "=" in token else _LAUNCH_OPTIONS[name]
            continue
        out.append(token)
    return out


def launch(args: argparse.Namespace, argv: list[str], settings, *, module: str, out: Path,
           units: list[str], meta):
    """Run the sweep's ``units`` (record names in ``out``) on ``settings``' launcher and return
    ``meta`` with the launch's provenance; ``None`` after ``--dry-run``.  The local launcher
    returns ``meta`` as it is: the caller computes the cells itself."""
    import dataclasses

    from rh_lens.launch import Plan, drive

    plan = Plan.make(out, units, settings.jobs)
    if settings.dry_run:
        print(plan.describe(settings))
        return None
    if settings.launcher == "local":
        return meta
    provenance = drive(plan, settings, module=module, argv=worker_argv(argv),
                       progress=not args.quiet)
    return dataclasses.replace(meta, extra={**meta.extra, "launch": provenance})


def niah_inputs(needles: Path | None, haystack: Path | None, *, n_needles: int, seed: int):
    """``(needles, haystacks, source)``: the zoo's held-out needles, or a needles file with a
    folder of .txt files (one haystack for all) or one subfolder per needle (the reference)."""
    from rh_lens.niah import haystack_from_folder, read_needles
    from rh_lens.zoo.inputs import zoo_inputs

    if needles is None:
        if haystack is not None:
            raise ValueError("--haystack needs --needles")
        found, haystacks = zoo_inputs(n_needles, seed=seed)
        return found, haystacks, {"needles": "zoo held-out templates", "seed": seed}
    if haystack is None:
        raise ValueError("--needles needs --haystack (a folder of .txt files)")
    found = read_needles(needles)
    if not haystack.is_dir():
        raise ValueError(f"haystack folder {haystack} does not exist")
    folders = sorted(p for p in haystack.iterdir() if p.is_dir())
    if folders:  # the reference layout: one haystack folder per needle, in name order
        if len(folders) != len(found):
            raise ValueError(f"{haystack}: {len(found)} needles but {len(folders)} "
                             "haystack folders (the reference layout has one per needle)")
        haystacks = [haystack_from_folder(f) for f in folders]
    else:
        haystacks = [haystack_from_folder(haystack)] * len(found)
    return found, haystacks, {"needles": str(needles), "haystack": str(haystack)}


def sweep_identity(model, spec: str, needles, source: dict, **extra) -> dict:
    """What a NIAH sweep's store is: the model (shape, dtype, weights) and its inputs, plus
    ``extra`` (after the needles)."""
    from rh_lens.models import model_facts, weights_fingerprint

    facts = model_facts(model)
    return {
        "model": spec,
        "shape": {"n_layers": facts.n_layers, "n_heads": facts.n_heads,
                  "n_kv_heads": facts.n_kv_heads},
        "inputs": source,
        "needles": [vars(n) for n in needles],
        **extra,
        "dtype": str(model.cfg.dtype),
        "weights": weights_fingerprint(model),
    }


def load_scores(args: argparse.Namespace, *, needed: bool = True, shape=None,
                default_if_present: bool = False):
    """``(table, path)``: the ``[n_layers, n_heads]`` mean scores of ``--scores`` or of
    ``analyses.detect``'s default output for ``--model``.  Without ``--scores`` and not
    ``needed`` it is ``(None, None)``, unless ``default_if_present`` and the default exists."""
    from rh_lens.properties import load_head_scores

    path = args.scores
    if path is None:
        path = detect_dir(args.model)
        if not needed and not (default_if_present and path.exists()):
            return None, None
    if not path.exists():
        raise ValueError(f"no retrieval scores at {path}: run python -m analyses.detect "
                         f"--model {args.model} first, or pass --scores")
    scored_on = scores_model(path)
    if (scored_on is not None and not getattr(args, "scores_from_other_model", False)
            and model_identity(scored_on) != model_identity(args.model)):
        raise ValueError(f"--scores {path} were computed on model {scored_on!r}, not "
                         f"{args.model!r}; pass --scores-from-other-model to use them anyway")
    table = load_head_scores(path, score=args.score).mean
    if shape is not None and table.shape != tuple(shape):
        raise ValueError(f"--scores {path} has {table.shape[0]}x{table.shape[1]} heads, "
                         f"model {args.model} has {shape[0]}x{shape[1]}")
    return table, path


def scores_model(path: Path) -> str | None:
    """The model spec a detection directory records (None for a reference-format file)."""
    from rh_lens.results import RESULT_JSON, read_json

    if not path.is_dir() or not (path / RESULT_JSON).is_file():
        return None
    model = (read_json(path / RESULT_JSON).get("config") or {}).get("model")
    return None if model is None else str(model)


def model_identity(spec: str) -> str:
    """A model spec made comparable: a local path (of a llama2c spec too) resolved."""
    prefix = "llama2c:" if spec.startswith("llama2c:") else ""
    rest = spec[len(prefix):]
    if spec.startswith("zoo:"):
        return spec
    path = Path(rest.split(",")[0]).expanduser()
    return prefix + str(path.resolve()) if path.exists() else spec


def select_heads(text: str, *, scores, shape: dict, seed: int, what: str,
                 allow_all: bool = False) -> tuple[tuple[int, int], ...]:
    """One head set of a ``rh_lens.heads`` spec given as option ``what`` (``all`` only where
    allowed), for a model of ``shape`` (``n_layers``, ``n_heads``, ``n_kv_heads``); the first
    draw of ``random:K`` and ``matched:K``."""
    return select_head_sets(text, scores=scores, shape=shape, seed=seed, what=what,
                            allow_all=allow_all)[0]


def select_head_sets(text: str, *, scores, shape: dict, seed: int, what: str,
                     allow_all: bool = False, n_draws: int = 1
                     ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """:func:`select_heads`' head sets: ``n_draws`` seeded draws of ``random:K`` and
    ``matched:K`` (:func:`rh_lens.heads.select_heads`), one set of any other kind."""
    from rh_lens import heads

    spec = heads.parse_spec(text)
    if spec.kind == "all" and not allow_all:
        raise ValueError(f"{what} {text}: 'all' is only for --receivers")
    if spec.needs_scores and scores is None:
        raise ValueError(f"{what} {text}: {spec.kind}:K needs --scores (a detection directory)")
    try:
        return heads.select_heads(spec, scores=scores, seed=seed, n_draws=n_draws, **shape)
    except ValueError as err:
        raise ValueError(f"{what} {text}: {err}") from None


def save_figures(out: Path, figures: dict, *, self_contained: bool = False) -> None:
    """Each figure as ``out/<name>.html``; ``self_contained`` is ``--self-contained-figures``."""
    from rh_lens import plotting

    for name, fig in figures.items():
        plotting.save_figure(fig, out / f"{name}.html", self_contained=self_contained)


def run_guarded(run, args, argv) -> int:
    """``run(args, argv)``; bad input (an rh_lens error, any ``ValueError`` or ``OSError``) is
    reported in one line on stderr with exit status 2 instead of a traceback, and Ctrl-C in one
    line with status 130.  ``argv`` defaults to the command line, so results record it."""
    try:
        return run(args, sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as err:  # rh_lens.errors.RhLensError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished cell is saved; rerun the same command to resume",
              file=sys.stderr)
        return 130


def slug(spec: str) -> str:
    """A model spec as a directory name: ``zoo:llama-s`` -> ``zoo-llama-s``."""
    return spec.replace(":", "-").replace("/", "_")


def run_dir(kind: str, spec: str, *suffix: str) -> Path:
    """``runs/<kind>/<model>[-<suffix>...]``: where a script writes by default."""
    return Path("runs") / kind / "-".join([slug(spec), *suffix])


def detect_dir(spec: str) -> Path:
    """Where ``python -m analyses.detect --model SPEC`` writes by default."""
    return run_dir("detect", spec)
