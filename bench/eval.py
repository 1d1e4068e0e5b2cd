"""Evaluation benchmark: `nextlong-eval`'s probe scoring against transformers on the same probes and
the same random-weight model, side by side in one run.

Prints probe tokens/s of each (ours: one jitted forward per batch of probes, logits only at the
answer positions; transformers: a forward over prompt + answer with torch's fused attention, keeping
only those positions' logits too),
their ratio, the agreement of the exact-match verdicts and the largest answer log-likelihood gap. A
random model answers nothing, so a third of the probes take the model's own greedy continuation as
their answer (it must get those right) and a third that continuation with its last token changed.

    python bench/eval.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nextlong_eval.probes import Probe, ProbeFactory, ProbeSpec  # noqa: E402
from nextlong_eval.runner import Evaluator  # noqa: E402
from nextlong_eval.scoring import token_scores, verdict  # noqa: E402
from nextlong_jax.testing import hf_model, tiny_hf_dict  # noqa: E402
from nextlong_jax.train_config import load_config  # noqa: E402
from nextlong_contract.tokenizer import load_tokenizer  # noqa: E402

MODEL = dict(vocab_size=128256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=16384,
             bos_token_id=128000, eos_token_id=128001)


def with_own_answers(model, probes: list[Probe]) -> list[Probe]:
    out = []
    for p in probes:
        n = len(p.answer_ids)
        prompt = torch.tensor([p.prompt_ids])
        # An explicit mask: from pad_token_id alone, generate would mask the prompt's id-0 tokens ("!").
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                num_beams=1, pad_token_id=0)[0, -n:].tolist()
        wrong = greedy[:-1] + [(greedy[-1] + 1) % MODEL["vocab_size"]]
        out += [p, dataclasses.replace(p, answer_ids=greedy, gold_spans=[(0, n)]),
                dataclasses.replace(p, answer_ids=wrong, gold_spans=[(0, n)])]
    return out


def transformers_scores(model, probes: list[Probe]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Logits of the answer-predicting positions only (`logits_to_keep`), as ours: the peer at its fastest."""
    out = []
    with torch.no_grad():
        for p in probes:
            n = len(p.answer_ids)
            logits = model(torch.tensor([p.prompt_ids + p.answer_ids]), logits_to_keep=n + 1).logits[0]
            out.append(token_scores(logits[:-1].double().numpy(), np.asarray(p.answer_ids)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter probes, for a smoke run")
    args = parser.parse_args()
    lengths = (1024, 2048) if args.quick else (2048, 8192)
    tokenizer = load_tokenizer()
    probes = ProbeFactory(ProbeSpec(tasks=("niah_single_1", "niah_multikey_2", "vt"), lengths=lengths, samples=3),
                          tokenizer).all()
    hf = hf_model(tiny_hf_dict(**MODEL), std=0.3)
    hf.config._attn_implementation = "sdpa"  # torch's fused CPU attention: the peer at its fastest
    probes = with_own_answers(hf, probes)
    tokens = sum(len(p.prompt_ids) + len(p.answer_ids) for p in probes)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        config = load_config(ROOT / "configs" / "train" / "tiny-cpu.yaml",
                             ["data.source=unused", "runtime.dtype=float32", "runtime.attention_block_size=512"])
        scorer = Evaluator.load(config, hf=Path(tmp))
        scorer.score(probes)  # compiles once per length: not the throughput asked for
        started = time.perf_counter()
        ours = scorer.score(probes)
        ours_s = time.perf_counter() - started
    transformers_scores(hf, probes[:1])
    started = time.perf_counter()
    theirs = transformers_scores(hf, probes)
    theirs_s = time.perf_counter() - started
    ours_v = [verdict(p, *s) for p, s in zip(probes, ours)]
    theirs_v = [verdict(p, *s) for p, s in zip(probes, theirs)]
    agree = np.mean([a.exact == b.exact for a, b in zip(ours_v, theirs_v)])
    gap = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(ours, theirs))
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    print(f"{len(probes)} probes at {lengths} tokens, {tokens:,} tokens; model {params:.1f}M parameters (random), "
          f"float32, {torch.get_num_threads()} threads")
    print(f"  ours (jax, blockwise attention) : {tokens / ours_s:10,.0f} probe tokens/s")
    print(f"  transformers (torch sdpa)        : {tokens / theirs_s:10,.0f} probe tokens/s")
    print(f"  ratio ours / transformers        : {theirs_s / ours_s:.2f}")
    print(f"  exact-match verdicts agree       : {100 * agree:.1f}% ({sum(v.exact for v in ours_v)} exact of "
          f"{len(probes)} by ours, {sum(v.exact for v in theirs_v)} by transformers)")
    print(f"  max |answer token logprob gap|   : {gap:.2e}")


if __name__ == "__main__":
    main()
