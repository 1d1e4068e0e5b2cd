"""`nextlong-eval probes` scored (the generate scoring on SmolLM2 decoded by this stack, with lm-eval's
RULER metric: test_smollm2.py): the forced scorer gives an oracle 100% and a context-blind model chance,
teacher-forced exact match is a real greedy decode's verdict (transformers `generate`), and the
sequence-sharded evaluation on 8 devices equals one device. (What the probes are: test_probes.py.)"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nextlong_eval.probes import Probe, ProbeFactory, ProbeSpec
from nextlong_eval.scoring import generate_verdicts, token_scores, verdict

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"
SHAPE = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=1024,
             bos_token_id=128000, eos_token_id=128001)


@pytest.fixture(scope="module")
def essays():
    from nextlong_eval.probes import corpus_texts

    return corpus_texts("sample:pydocs", 300)


# Tasks whose probes fit the tiny model's 512 tokens: noise, essay and needle haystacks, one and four values.
SHORT = ("niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue")


def _probes(tokenizer, essays, length: int = 1024, tasks: tuple[str, ...] = SHORT) -> list[Probe]:
    return ProbeFactory(ProbeSpec(tasks=tasks, lengths=(length,), samples=2), tokenizer, essays).all()


def test_the_scorer_gives_an_oracle_everything_and_a_blind_model_chance(tokenizer, essays):
    from nextlong_eval.probes import SYNTHETIC

    rng = np.random.default_rng(0)
    probes = _probes(tokenizer, essays, tasks=SYNTHETIC)
    vocab = tokenizer.vocab_size
    # The oracle puts its largest logit on the gold token; the blind model cannot see the context,
    # so it predicts every position from the same distribution (here: the prompts' token counts).
    unigram = np.log1p(np.bincount(np.concatenate([p.prompt_ids for p in probes]), minlength=vocab))
    oracle, blind = [], []
    for p in probes:
        targets = np.asarray(p.answer_ids)
        logits = rng.normal(size=(len(targets), vocab))
        logits[np.arange(len(targets)), targets] = 50.0
        oracle.append(verdict(p, *token_scores(logits, targets)))
        blind.append(verdict(p, *token_scores(np.broadcast_to(unigram, (len(targets), vocab)), targets)))
    assert all(v.exact and v.string_match_all == 1.0 and v.answer_logprob > -1e-3 for v in oracle)
    assert not any(v.exact for v in blind)  # numbers, names, word lists: chance ~ 0
    assert np.mean([v.string_match_all for v in blind]) < 0.1


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from nextlong_jax.testing import hf_model, tiny_hf_dict

    directory = tmp_path_factory.mktemp("hf") / "tiny"
    model = hf_model(tiny_hf_dict(**SHAPE), std=0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def _scorer(hf_dir: Path, *overrides: str):
    from nextlong_eval.runner import Evaluator
    from nextlong_jax.train_config import load_config

    return Evaluator.load(load_config(CONFIG, ["data.source=unused", *overrides]), hf=hf_dir)


def test_teacher_forced_exact_match_is_the_greedy_decode_verdict(tiny_hf, tokenizer, essays):
    """On every probe, transformers' greedy `generate` emits the gold answer exactly when our one-pass
    verdict says so. A random model gets the real answers wrong, so each probe is also asked with the
    model's own greedy continuation as its answer (which it must then get right), and with that
    continuation's last token changed (wrong again)."""
    import torch

    model, directory = tiny_hf
    probes = []
    for p in _probes(tokenizer, essays, length=512):
        prompt = torch.tensor([p.prompt_ids])
        n = len(p.answer_ids)
        # An explicit mask: from pad_token_id alone, generate would mask the prompt's id-0 tokens ("!").
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                num_beams=1, pad_token_id=0)[0, -n:].tolist()
        probes.append((p, greedy))
        own = replace(p, answer_ids=greedy, gold_spans=[(0, n)])
        wrong = replace(p, answer_ids=greedy[:-1] + [(greedy[-1] + 1) % SHAPE["vocab_size"]], gold_spans=[(0, n)])
        probes += [(own, greedy), (wrong, greedy)]
    scorer = _scorer(directory, "runtime.dtype=float32", "runtime.param_dtype=float32")
    scores = scorer.score([p for p, _ in probes])
    exact = [verdict(p, *s).exact for (p, _), s in zip(probes, scores)]
    assert exact == [p.answer_ids == greedy for p, greedy in probes]
    assert sum(exact) == len(probes) // 3
    # The log-likelihoods are transformers' too.
    for (p, _), (logprob, _) in list(zip(probes, scores))[:6]:
        with torch.no_grad():
            logits = model(torch.tensor([p.prompt_ids + p.answer_ids])).logits[0].double().numpy()
        theirs, _ = token_scores(logits[len(p.prompt_ids) - 1:-1], np.asarray(p.answer_ids))
        np.testing.assert_allclose(logprob, theirs, atol=2e-5)  # measured 3.6e-6


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """A small nextlong-synth output: 512-token sequences, several meta-chunks per segment."""
    from synth.cli import main

    out = tmp_path_factory.mktemp("synth") / "out"
    assert main(["--meta", "sample:pydocs", "--max-meta-docs", "40", "--embedder", "hashing", "--index", "faiss-flat",
                 "--seq-len", "512", "--chunk-tokens", "48", "--num-shards", "1", "--max-sequences", "8",
                 "--out", str(out)]) == 0
    from synth.tfrecord import read_dataset

    return list(read_dataset(out, with_provenance=True).as_numpy_iterator())


def test_the_dependency_probe_replaces_only_the_earlier_meta_chunks(synthesized):
    """The replaced context keeps the original's length, layout and positions: only the tokens of
    m_1..m_j-1 change, each span to other meta-documents' text of its exact length."""
    from nextlong_eval.dependency import meta_spans, replaced, targets

    spans = [meta_spans(e) for e in synthesized]
    chosen = targets(spans, per_segment=2)
    assert chosen and all(len(t.earlier) >= 1 and t.distance > 0 for t in chosen)
    rng = np.random.default_rng(0)
    for t in chosen:
        original = synthesized[t.row]
        for a, b in [*t.earlier, t.span]:  # meta-chunks are meta-role runs, joiner included
            assert (original["token_roles"][a:b] == 1).all()
        others = np.concatenate([synthesized[r]["input_ids"][a:b] for r in range(len(synthesized)) if r != t.row
                                 for chunks in spans[r] for a, b in chunks])
        variant = replaced(original["input_ids"], t, others, rng)
        assert variant.shape == original["input_ids"].shape
        changed = np.flatnonzero(variant != original["input_ids"])
        inside = np.zeros(len(variant), bool)
        for a, b in t.earlier:
            inside[a:b] = True
            text = others.tobytes()
            assert variant[a:b].tobytes() in text + text  # a stretch of the others' meta text (maybe wrapping)
        assert inside[changed].all() and changed.size > 0.5 * inside.sum()
        a, b = t.span
        assert (variant[a:b] == original["input_ids"][a:b]).all()


def test_token_nll_is_transformers_loss(tiny_hf, synthesized):
    import torch

    model, directory = tiny_hf
    rows = np.stack([e["input_ids"] for e in synthesized[:2]]).astype(np.int32)
    positions = np.stack([e["positions"] for e in synthesized[:2]]).astype(np.int32)
    segments = np.stack([e["segment_ids"] for e in synthesized[:2]]).astype(np.int32)
    nll = _scorer(directory, "runtime.dtype=float32").token_nll(rows, positions, segments)
    for r in range(2):
        end = int((segments[r] == 1).sum())  # the first segment, as one document
        with torch.no_grad():
            logits = model(torch.tensor(rows[r:r + 1, :end].astype(np.int64))).logits[0].double().numpy()
        theirs, _ = token_scores(logits[:-1], rows[r, 1:end])
        np.testing.assert_allclose(nll[r, :end - 1], -theirs, atol=3e-4)  # measured 5.6e-5
        assert nll[r, end - 1] == 0  # the next token is in another segment


def test_sequence_sharded_evaluation_equals_one_device(tiny_hf, tokenizer, essays, synthesized, tmp_path):
    from multidevice import run_on_8_devices

    _, directory = tiny_hf
    probes = _probes(tokenizer, essays, length=512)[:8]
    scorer = _scorer(directory)
    single = scorer.score(probes)
    features = {k: np.stack([e[k] for e in synthesized[:4]]).astype(np.int32).tolist()
                for k in ("input_ids", "positions", "segment_ids")}
    nll = scorer.token_nll(*(np.asarray(features[k]) for k in ("input_ids", "positions", "segment_ids")))
    path = tmp_path / "probes.json"
    path.write_text(json.dumps({"probes": [p.__dict__ for p in probes], "packed": features}))
    out = run_on_8_devices(__file__, str(directory), str(path))
    sharded = json.loads(out.strip().splitlines()[-1])
    assert sharded["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 2}
    np.testing.assert_allclose(nll, sharded["nll"], atol=1.5e-4)  # measured 2.7e-5
    for (logprob, rank), (theirs_lp, theirs_rank) in zip(single, sharded["scores"]):
        np.testing.assert_allclose(logprob, theirs_lp, atol=2e-5)  # measured 1.9e-6
        # Ranks deep in the vocabulary may swap near-equal logits; the argmax verdicts may not.
        assert ((rank == 0) == (np.asarray(theirs_rank) == 0)).all() and np.abs(rank - theirs_rank).max() <= 8


def _child(hf_dir: str, inputs: str) -> None:
    given = json.loads(Path(inputs).read_text())
    probes = [Probe(**{**p, "gold_spans": [tuple(s) for s in p["gold_spans"]]}) for p in given["probes"]]
    scorer = _scorer(Path(hf_dir), "mesh.fsdp=4", "mesh.sequence=2", "runtime.attention_backend=ring")
    scores = scorer.score(probes)
    nll = scorer.token_nll(*(np.asarray(given["packed"][k]) for k in ("input_ids", "positions", "segment_ids")))
    print(json.dumps({"mesh": dict(scorer.mesh.shape), "nll": nll.tolist(),
                      "scores": [[lp.tolist(), rank.tolist()] for lp, rank in scores]}))


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from nextlong_eval.cli import main

    monkeypatch.chdir(ROOT)
    common = ["--config", str(CONFIG), "--out", str(tmp_path / "out")]
    assert main(["probes", "--ckpt", str(tmp_path / "nothing"), *common]) == 1
    assert "not a checkpoint step" in capsys.readouterr().err
    assert main(["probes", "--ckpt", str(tmp_path), "--lengths", "100", "--tasks", "niah_multiquery", *common]) == 1
    err = capsys.readouterr().err
    assert "100 tokens hold no niah_multiquery probe" in err and len(err.strip().splitlines()) == 1
    assert main(["probes", "--ckpt", str(tmp_path), "--tasks", "niah_single_1,qa_1", *common]) == 1
    err = capsys.readouterr().err
    assert "qa_1 reads squad from a local file: pass --squad FILE" in err and len(err.strip().splitlines()) == 1


def test_dependency_refuses_ids_beyond_the_model(train_data, tmp_path, capsys, monkeypatch):
    """The tiny model's 311 ids against Llama-3 data: refused by the manifest before the model loads, and
    for an output whose manifest predates its tokenizer record, by the ids themselves."""
    from nextlong_eval.cli import main
    from nextlong_jax.testing import hf_model, tiny_hf_dict

    monkeypatch.chdir(ROOT)
    hf_dir = tmp_path / "hf"
    hf_model(tiny_hf_dict()).save_pretrained(hf_dir, safe_serialization=True)
    old = tmp_path / "old"
    shutil.copytree(train_data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    manifest_says = "/manifest.json: its tokenizer llama3 has 128256 ids, more than the model's vocab_size 311"
    for data, says in ((train_data, re.escape(f"{train_data}{manifest_says}: re-synthesize")),
                       (old, r"the sequences: token id \d+ is beyond the model's vocab_size 311: re-synthesize")):
        assert main(["dependency", "--hf", str(hf_dir), "--data", str(data), "--config", str(CONFIG),
                     "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert re.match(f"nextlong-eval: error: {says}", err) and len(err.strip().splitlines()) == 1, err


if __name__ == "__main__":
    _child(*sys.argv[1:])
