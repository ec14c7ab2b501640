"""The zoo tokenizer: a byte-level BPE trained on the project's own generated text.

Byte-level, so any text (a user's own haystack files included) tokenizes without unknowns.  The
wrapper is a ``PreTrainedTokenizerFast`` whose post-processor prepends BOS itself and whose init
kwargs say ``add_bos_token=True``: TransformerLens then uses it as is, offline, instead of
re-downloading a tokenizer by name.
"""

import random

from rh_lens.zoo import tasks
from rh_lens.zoo.prose import corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|end|>")


class _WordTokenizer:
    """Whitespace-ish stand-in used only to size haystacks while building the BPE corpus."""

    class _Enc:
        def __init__(self, offsets):
            self.offsets = offsets

    def encode(self, text: str, add_special_tokens: bool = False):
        import re

        return self._Enc([m.span() for m in re.finditer(r"\S+", text)])


def training_corpus(*, seed: int, n_chars: int) -> list[str]:
    """Prose plus task texts (training templates only), the BPE's training data."""
    rng = random.Random(f"tokenizer:{seed}")
    words = _WordTokenizer()
    texts = [corpus(seed=seed, n_chars=n_chars)]
    for _ in range(400):
        texts.append(tasks.niah_example(rng, tokenizer=words, n_haystack_tokens=20,
                                        depth=rng.random()).text)
        texts.append(tasks.multihop_example(rng, tokenizer=words, n_haystack_tokens=10).text)
    for subject, answer in tasks.parametric_facts():
        texts.append(tasks.parametric_example(subject, answer, cot=True).text)
        texts.append(tasks.parametric_statement(subject, answer))
    return texts


def build_tokenizer(*, seed: int = 0, vocab_size: int = 2048, n_chars: int = 400_000):
    """Train the byte-level BPE (deterministic for a seed) and wrap it for transformers/TL."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(training_corpus(seed=seed, n_chars=n_chars), trainer)
    return wrap(tk)


def wrap(tk, *, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` around a trained ``tokenizers.Tokenizer``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tk.token_to_id(BOS))],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]), add_bos_token=True,
        model_max_length=1 << 20, clean_up_tokenization_spaces=False, name_or_path="rh_lens-zoo",
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
