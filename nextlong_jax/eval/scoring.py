"""Verdicts from one teacher-forced pass, no sampling.

Greedy decoding emits the gold answer if and only if every gold token is the argmax given the prompt
and the gold tokens before it: so exact match under greedy decoding is "every answer token has rank 0",
read off the log-probabilities of a single forward pass over prompt + answer (no decode loop, no KV
cache). RULER's `string_match_all` (the share of gold strings the output contains) is computed the
same way per gold string: a gold string counts when each of its tokens has rank 0. Under teacher
forcing the parts come in the probe's order; a model that would list them in another order scores
lower here than under free generation (stated beside the results).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nextlong_jax.eval.probes import Probe


@dataclass(frozen=True)
class Verdict:
    task: str
    length: int
    depth: float
    exact: bool
    string_match_all: float
    answer_logprob: float  # sum over the answer's tokens
    ranks: list[int]  # of each gold token among the vocabulary (0: the argmax)

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(probe: Probe, logprobs: np.ndarray, ranks: np.ndarray) -> Verdict:
    """`logprobs`, `ranks`: [len(answer)] of each answer token, given the prompt and the answer before it."""
    ranks = np.asarray(ranks)[:len(probe.answer_ids)]
    matched = [bool((ranks[a:b] == 0).all()) for a, b in probe.gold_spans]
    return Verdict(probe.task, probe.length, probe.depth, exact=bool((ranks == 0).all()),
                   string_match_all=float(np.mean(matched)),
                   answer_logprob=float(np.sum(logprobs[:len(probe.answer_ids)])), ranks=ranks.tolist())


def token_scores(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [..., V] and target ids [...] -> (log-probability of each target, its rank)."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    gold = np.take_along_axis(logits, targets[..., None], axis=-1)
    return gold[..., 0] - logz, (logits > gold).sum(axis=-1)
