"""What the analysis scripts share: the backend options, the bad-input guard of ``main`` and
default run directories."""

import argparse
import sys
from pathlib import Path


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--no-fast-prefill``: which engine runs the model (rh_lens.models)."""
    from rh_lens.models import BACKENDS, DEFAULT_BACKEND

    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="hooked: HookedTransformer (transformer-lens 3.x); bridge: "
                             f"TransformerBridge around the Hugging Face model (default "
                             f"{DEFAULT_BACKEND})")
    parser.add_argument("--no-fast-prefill", action="store_true",
                        help="bridge: fill the key/value cache eagerly, not with SDPA")


def backend_kwargs(args: argparse.Namespace) -> dict:
    """The ``load_model`` keywords of :func:`add_backend_args`'s options."""
    if args.backend == "hooked":
        return {"backend": "hooked"}
    return {"backend": "bridge", "fast_prefill": False if args.no_fast_prefill else None}


def run_guarded(run, args, argv) -> int:
    """``run(args, argv)``; bad input (an rh_lens error, any ``ValueError`` or ``OSError``) is
    reported in one line on stderr with exit status 2 instead of a traceback."""
    try:
        return run(args, argv)
    except (ValueError, OSError) as err:  # rh_lens.errors.RhLensError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def sweep_buffer(model, args: argparse.Namespace, n_ctx: int) -> tuple[int, int]:
    """The sweep's ``(buffer, max_new_tokens)`` where ``--buffer`` / ``--max-new-tokens`` are not
    given: a quarter of the context (at most 200) for question and answer, plus the chat
    template's own tokens with ``--chat``; decoding up to an eighth of the context (at most 50)."""
    base = min(200, n_ctx // 4)
    buffer = args.buffer
    if buffer is None:
        from rh_lens.niah import chat_overhead

        buffer = base + (chat_overhead(model) if args.chat else 0)
    max_new = args.max_new_tokens or max(1, min(50, base // 2))
    return buffer, max_new


def slug(spec: str) -> str:
    """A model spec as a directory name: ``zoo:llama-s`` -> ``zoo-llama-s``."""
    return spec.replace(":", "-").replace("/", "_")


def detect_dir(spec: str) -> Path:
    """Where ``python -m analyses.detect --model SPEC`` writes by default."""
    return Path("runs") / "detect" / slug(spec)
