"""Load a model from any spec, decode greedily, and show where each head looks at every step.

    python -m analyses.inspect_model --model zoo:llama-s
    python -m analyses.inspect_model --model llama2c:../shared/models/llama2c/stories260K.bin \\
        --prompt "Once upon a time"

For each generated token it prints the heads whose strongest attention (top-1 key) falls on an
earlier occurrence of the very token being emitted: the copy events that the retrieval score of
``analyses.detect`` counts.
"""

import argparse
from dataclasses import dataclass

from analyses import _cli

DEFAULT_PROMPT = (
    "The secret ingredient of Mara's soup is purple ginger and sea salt. Mara lives by the sea "
    "and cooks every day. Based on the content of the book, Question: What is the secret "
    "ingredient of Mara's soup?\nAnswer:"
)


@dataclass(frozen=True)
class Step:
    token_id: int
    token: str
    copying_heads: tuple[tuple[int, int, int], ...]  # (layer, head, key position)


def compute_inspection(model, prompt: str, *, max_new_tokens: int = 20) -> list[Step]:
    """Greedy decoding of ``prompt`` (``rh_lens.decode``) until a newline, end-of-sequence or
    ``max_new_tokens``; each step with the heads whose top-1 key holds the emitted token."""
    import torch

    from rh_lens.decode import decode_greedy
    from rh_lens.models import tokenize
    from rh_lens.scoring import copy_events

    prompt_ids = tokenize(model, prompt)
    (decoded,) = decode_greedy(model, prompt_ids[None], max_new_tokens=max_new_tokens,
                               chunk_size=max(1, len(prompt_ids)))
    emitted = torch.from_numpy(decoded.tokens)
    positions = torch.from_numpy(decoded.positions).long()
    sequence = torch.cat([prompt_ids.cpu(), emitted])
    copies = copy_events(positions, emitted, sequence, (0, len(sequence)))
    steps, text = [], ""
    for t, token_id in enumerate(decoded.tokens.tolist()):
        # Decode the whole continuation: SentencePiece-style tokenizers drop a token's leading
        # space when it is decoded alone.
        new_text = model.tokenizer.decode(decoded.tokens[: t + 1].tolist())
        copying = tuple((layer, head, int(positions[t, layer, head]))
                        for layer, head in torch.nonzero(copies[t]).tolist())
        steps.append(Step(token_id, new_text[len(text):], copying))
        text = new_text
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _cli.add_model_args(parser)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    return _cli.run_guarded(_run, parser.parse_args(argv), argv)


def _run(args, argv) -> int:
    from rh_lens.heads import label
    from rh_lens.models import model_facts

    model = _cli.load_model(args)
    facts = model_facts(model)
    print(f"{args.model}: {facts.n_layers} layers x {facts.n_heads} heads "
          f"({facts.n_kv_heads} key/value heads), d_model {facts.d_model}, "
          f"n_ctx {facts.n_ctx}, {facts.positional} positions")
    steps = compute_inspection(model, args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"generated: {''.join(s.token for s in steps)!r}")
    for step in steps:
        heads = ", ".join(f"{label((lay, h))}@{pos}" for lay, h, pos in step.copying_heads[:8])
        print(f"  {step.token!r:>14}  copied by: {heads or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
