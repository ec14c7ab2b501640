"""What the analysis scripts share: the bad-input guard of ``main`` and default run directories."""

import sys
from pathlib import Path


def run_guarded(run, args, argv) -> int:
    """``run(args, argv)``; bad input (an rh_lens error, any ``ValueError`` or ``OSError``) is
    reported in one line on stderr with exit status 2 instead of a traceback."""
    try:
        return run(args, argv)
    except (ValueError, OSError) as err:  # rh_lens.errors.RhLensError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def slug(spec: str) -> str:
    """A model spec as a directory name: ``zoo:llama-s`` -> ``zoo-llama-s``."""
    return spec.replace(":", "-").replace("/", "_")


def detect_dir(spec: str) -> Path:
    """Where ``python -m analyses.detect --model SPEC`` writes by default."""
    return Path("runs") / "detect" / slug(spec)
