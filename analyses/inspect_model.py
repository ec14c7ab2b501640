"""Load a model from any spec, decode greedily, and show where each head looks at every step.

    python -m analyses.inspect_model --model zoo:llama-s
    python -m analyses.inspect_model --model llama2c:../shared/models/llama2c/stories260K.bin \\
        --prompt "Once upon a time"

For each generated token it prints the heads whose strongest attention (top-1 key) falls on an
earlier occurrence of the very token being emitted: the copy events that the retrieval score of
``analyses.detect`` counts.
"""

import argparse
import sys
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
    """Greedy decoding with a KV cache; records each head's top-1 key at every step."""
    import torch

    from rh_lens import hooks
    from rh_lens.models import check_context, forward_chunk, new_kv_state, tokenize

    tokens = tokenize(model, prompt)
    check_context(model, len(tokens) + max_new_tokens)
    recorder = hooks.LastQueryArgmax(model.cfg.n_layers)
    state = new_kv_state(model)
    steps: list[Step] = []
    with torch.no_grad(), model.hooks(fwd_hooks=recorder.hooks):
        logits = forward_chunk(model, tokens[None], state)
        sequence = tokens.tolist()
        generated = ""
        for _ in range(max_new_tokens):
            next_id = int(logits[0, -1].argmax())
            keys = recorder.table()[0]  # [n_layers, n_heads]: where each head looked
            copying = tuple(
                (layer, head, int(keys[layer, head]))
                for layer in range(keys.shape[0])
                for head in range(keys.shape[1])
                if sequence[int(keys[layer, head])] == next_id
            )
            sequence.append(next_id)
            # Decode the whole continuation: SentencePiece-style tokenizers drop a token's
            # leading space when it is decoded alone.
            new_text = model.tokenizer.decode(sequence[len(tokens):])
            text = new_text[len(generated):]
            generated = new_text
            steps.append(Step(next_id, text, copying))
            if next_id == model.tokenizer.eos_token_id or "\n" in text:
                break
            logits = forward_chunk(model, torch.tensor([[next_id]]), state)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="zoo:llama-s", help="model spec (see rh_lens.models)")
    _cli.add_backend_args(parser)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--device", default=None, help='"cpu", "cuda" or "auto"')
    parser.add_argument("--n-ctx", type=int, default=None)
    args = parser.parse_args(argv)

    from rh_lens.errors import RhLensError
    from rh_lens.heads import label
    from rh_lens.models import load_model, model_facts

    try:
        model = load_model(args.model, device=args.device, n_ctx=args.n_ctx,
                       **_cli.backend_kwargs(args))
        facts = model_facts(model)
        print(
            f"{args.model}: {facts.n_layers} layers x {facts.n_heads} heads "
            f"({facts.n_kv_heads} key/value heads), d_model {facts.d_model}, "
            f"n_ctx {facts.n_ctx}, {facts.positional} positions"
        )
        steps = compute_inspection(model, args.prompt, max_new_tokens=args.max_new_tokens)
    except RhLensError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"generated: {''.join(s.token for s in steps)!r}")
    for step in steps:
        heads = ", ".join(f"{label((lay, h))}@{pos}" for lay, h, pos in step.copying_heads[:8])
        print(f"  {step.token!r:>14}  copied by: {heads or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
