"""The reference's detection loop, transcribed line by line for a TransformerLens model: the slow
obvious implementation that ``--protocol reference`` is held to.

Its haystack is read from a folder of ``.txt`` files, as the reference reads its own; its
decoding reruns the whole sequence at every step and walks over layers and heads in Python, as
the reference's ``retrieval_calculate`` does; ROUGE comes from the ``rouge_score`` package the
reference uses.  Only the model call differs: ``run_with_cache`` instead of Hugging Face's
``output_attentions``.  The period tokens, which the reference hard-codes for Llama-2, are given.
"""

import glob
from dataclasses import dataclass

import numpy as np
import torch
from rouge_score import rouge_scorer

from rh_lens import hooks

SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@dataclass
class ReferenceTrial:
    prompt_ids: list[int]
    needle_start: int
    needle_end: int
    output: list[int]
    response: str
    rouge: float
    step_score: np.ndarray  # [n_layers, n_heads], the reference's summed 1 / (end - start)


class ReferenceLoop:
    def __init__(self, model, *, context_lengths, final_context_length_buffer, decode_len,
                 period_tokens):
        self.model = model
        self.enc = model.tokenizer
        self.context_lengths = list(context_lengths)
        self.final_context_length_buffer = final_context_length_buffer
        self.decode_len = decode_len
        self.period_tokens = list(period_tokens)
        self.layer_num, self.head_num = model.cfg.n_layers, model.cfg.n_heads

    # -- the reference's haystack ---------------------------------------------------------

    def read_context_files(self):
        context = ""
        max_context_length = max(self.context_lengths)
        while len(context.split()) < max_context_length:
            for file in glob.glob(f"{self.haystack_dir}/*.txt"):
                with open(file) as f:
                    context += f.read()
        return context

    def encode_and_trim(self, context, context_length):
        tokens = self.enc.encode(context)
        if len(tokens) > context_length:
            context = self.enc.decode(tokens[:context_length])
        return context

    def insert_needle(self, context, depth_percent, context_length):
        tokens_needle = self.enc.encode(self.needle)
        tokens_context = self.enc.encode(context)
        context_length -= self.final_context_length_buffer
        if len(tokens_context) + len(tokens_needle) > context_length:
            tokens_context = tokens_context[:context_length - len(tokens_needle)]
        if depth_percent == 100:
            tokens_new_context = tokens_context + tokens_needle
        else:
            insertion_point = int(len(tokens_context) * (depth_percent / 100))
            tokens_new_context = tokens_context[:insertion_point]
            while tokens_new_context and tokens_new_context[-1] not in self.period_tokens:
                insertion_point -= 1
                tokens_new_context = tokens_context[:insertion_point]
            tokens_new_context += tokens_needle + tokens_context[insertion_point:]
        return self.enc.decode(tokens_new_context)

    def generate_context(self, context_length, depth_percent):
        context = self.read_context_files()
        context = self.encode_and_trim(context, context_length)
        return self.insert_needle(context, depth_percent, context_length)

    # -- span, decoding, scores -----------------------------------------------------------

    def find_needle_idx(self, needle):
        needle_ids = self.enc(needle, add_special_tokens=False)["input_ids"]
        span_len = len(needle_ids)
        for i in range(len(self.prompt_ids)):
            token_span = self.prompt_ids[i : i + span_len]
            span_ids = set(token_span.tolist())
            overlap = float(len(span_ids.intersection(set(needle_ids)))) / len(set(needle_ids))
            if overlap > 0.9:
                return i, i + span_len
        return -1, -1

    def retrieval_calculate(self, patterns, retrieval_score, inp, topk=1):
        for layer_idx in range(self.layer_num):
            for head_idx in range(self.head_num):
                values, idx = patterns[layer_idx][0][head_idx][-1].topk(topk)
                for _v, i in zip(values, idx, strict=True):
                    if (self.needle_start <= i < self.needle_end
                            and inp == self.prompt_ids[i].item()):
                        retrieval_score[layer_idx][head_idx] += 1 / (
                            self.needle_end - self.needle_start)
                        break

    @torch.no_grad()
    def decode(self, sequence):
        names = [hooks.pattern(layer) for layer in range(self.layer_num)]
        output = []
        retrieval_score = [[0 for _ in range(self.head_num)] for _ in range(self.layer_num)]
        sequence = list(sequence)
        for _step_i in range(self.decode_len):
            logits, cache = self.model.run_with_cache(
                torch.tensor([sequence]), names_filter=lambda name: name in names)
            inp = int(logits[0, -1].argmax())
            step_token = self.enc.convert_ids_to_tokens(inp)
            output.append(inp)
            sequence.append(inp)
            self.retrieval_calculate([cache[n] for n in names], retrieval_score, inp)
            if step_token == "<0x0A>" or inp == 144:
                break
        return output, retrieval_score

    def evaluate(self, needle, haystack_dir, context_length, depth_percent) -> ReferenceTrial:
        self.needle, self.haystack_dir = needle.needle, haystack_dir
        self.real_needle, self.retrieval_question = needle.answer, needle.question
        context = self.generate_context(context_length, depth_percent)
        question = f"Based on the content of the book, Question: {self.retrieval_question}\nAnswer:"
        input_ids = self.enc(context + question, return_tensors="pt")["input_ids"]
        self.prompt_ids = input_ids[0, :]
        self.needle_start, self.needle_end = self.find_needle_idx(self.real_needle)
        output, retrieval_score = self.decode(input_ids[0].tolist())
        response = self.enc.decode(output, skip_special_tokens=True).strip()
        score = SCORER.score(self.real_needle, response)["rouge1"].recall * 100
        return ReferenceTrial(self.prompt_ids.tolist(), self.needle_start, self.needle_end,
                              output, response, score, np.array(retrieval_score, dtype=float))
