"""The probes' two scorings.

`generate` is RULER's (scripts/eval/evaluate.py and scripts/eval/synthetic/constants.py): a greedy
continuation of the task's `tokens_to_generate` tokens (stopping at end of sequence), post-processed
as RULER does, scored by `string_match_all` (the share of gold strings the prediction contains,
case-insensitive) or, for qa_1 and qa_2, `string_match_part` (whether it contains any): numbers to set
beside RULER's.

`forced` is one teacher-forced pass, no decoding: greedy decoding emits the gold continuation if and
only if every gold token is the argmax given the prompt and the gold tokens before it, so exact match
is "every continuation token has rank 0", read off the log-probabilities of a single forward pass over
prompt + continuation (no decode loop, no KV cache); per gold string likewise (its `string_match_all`),
and the continuation's log-likelihood. Parts come in the probe's order, and the continuation must take
the probe's form: stricter than free generation, and cheap enough for curves during training.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nextlong_eval.probes import Probe
from nextlong_contract.tokenizer import TextTokenizer

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: stripped, control characters made newlines, stripped again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    return float(any(r.lower() in prediction.lower() for r in references))


METRICS = {"qa_1": string_match_part, "qa_2": string_match_part}  # every other task: string_match_all


@dataclass(frozen=True)
class Generated:
    task: str
    length: int
    index: int
    depth: float | None
    prediction: str  # post-processed
    score: float  # RULER's metric for the task, 0..1

    def to_dict(self) -> dict:
        return asdict(self)


def generated_verdict(probe: Probe, text: str) -> Generated:
    prediction = postprocess(text)
    score = METRICS.get(probe.task, string_match_all)(prediction, probe.outputs)
    return Generated(probe.task, probe.length, probe.index, probe.depth, prediction, score)


Generate = Callable[[list[list[int]], int, Sequence[int]], list[list[int]]]


def generate_verdicts(probes: list[Probe], generate: Generate, tokenizer: TextTokenizer,
                      stops: Sequence[int]) -> list[Generated]:
    """`generate(prompts, max_new_tokens, stop_ids)`: greedy new tokens of each prompt (the shape of
    `Evaluator.generate`), called once per generation budget. Each continuation is cut at its first stop
    id (end of sequence) and decoded without special tokens, as RULER's Hugging Face client reads it."""
    by_budget: dict[int, list[int]] = defaultdict(list)
    for i, probe in enumerate(probes):
        by_budget[probe.max_new_tokens].append(i)
    texts: dict[int, str] = {}
    for budget, members in by_budget.items():
        for i, ids in zip(members, generate([probes[i].prompt_ids for i in members], budget, stops)):
            ids = list(ids)
            ended = [ids.index(s) for s in stops if s in ids]
            texts[i] = tokenizer.backend.decode(ids[:min(ended, default=len(ids))], skip_special_tokens=True)
    return [generated_verdict(p, texts[i]) for i, p in enumerate(probes)]


@dataclass(frozen=True)
class Verdict:
    """A teacher-forced verdict."""

    task: str
    length: int
    index: int
    depth: float | None
    exact: bool
    string_match_all: float
    answer_logprob: float  # sum over the continuation's tokens
    ranks: list[int]  # of each continuation token among the vocabulary (0: the argmax)

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(probe: Probe, logprobs: np.ndarray, ranks: np.ndarray) -> Verdict:
    """`logprobs`, `ranks`: [len(answer)] of each continuation token, given the prompt and those before it."""
    ranks = np.asarray(ranks)[:len(probe.answer_ids)]
    matched = [bool((ranks[a:b] == 0).all()) for a, b in probe.gold_spans]
    return Verdict(probe.task, probe.length, probe.index, probe.depth, exact=bool((ranks == 0).all()),
                   string_match_all=float(np.mean(matched)),
                   answer_logprob=float(np.sum(logprobs[:len(probe.answer_ids)])), ranks=ranks.tolist())


def token_scores(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [..., V] and target ids [...] -> (log-probability of each target, its rank)."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    gold = np.take_along_axis(logits, targets[..., None], axis=-1)
    return gold[..., 0] - logz, (logits > gold).sum(axis=-1)
