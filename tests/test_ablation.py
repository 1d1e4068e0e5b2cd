"""`nextlong-eval ablation` end to end on its micro preset: every arm synthesized from the same
meta-documents, trained for the same tokens from the same seed, probed and measured on held-out
meta-documents none of them trained on; the report has one row per arm; a rerun redoes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextlong_eval.ablation import ARMS, AblationConfig, run_ablation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("ablation")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the preset names the training config relative to the repository
    try:
        config = AblationConfig.load(ROOT / "configs" / "eval" / "ablation-micro.yaml")
        report = run_ablation(config, out, log=lambda _: None)
    finally:
        os.chdir(cwd)
    return config, out, report


def _ids(directory: Path, key: str = "meta_doc_ids") -> set[str]:
    from synth.tfrecord import read_dataset

    return {m.decode() for ex in read_dataset(directory, with_provenance=True).as_numpy_iterator() for m in ex[key]}


def test_every_arm_is_trained_alike_and_evaluated_on_documents_it_never_saw(ablation):
    config, out, report = ablation
    assert config.arms == ARMS
    heldout = _ids(out / "data" / "heldout")
    train_docs = {json.loads(line)["id"] for line in (out / "meta-train.jsonl").read_text().splitlines()}
    assert heldout and not heldout & train_docs
    summaries = [json.loads((out / "eval" / arm / "summary.json").read_text()) for arm in ARMS]
    for arm, summary in zip(ARMS, summaries):
        assert _ids(out / "data" / arm) <= train_docs
        manifest = json.loads((out / "data" / arm / "manifest.json").read_text())
        assert manifest["counts"]["strategy"] == arm and manifest["counts"]["sequences"] <= config.sequences
        steps = [json.loads(line)["step"] for line in (out / "runs" / arm / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert {p.name for p in (out / "eval" / arm).iterdir()} >= {"results.json", "table.md", "dependency.json"}
    assert len({s["tokens_trained"] for s in summaries}) == 1  # the same budget for every arm
    contents = {json.loads((out / "data" / arm / "manifest.json").read_text())["content_hash"] for arm in ARMS}
    assert len(contents) == len(ARMS)  # four different data sets
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(ARMS)
    for name in ("loss-by-role.png", "probes-and-dependency.png"):
        assert f"![{name}]({name})" in text and (out / name).read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_reuses_every_finished_stage(ablation, monkeypatch):
    config, out, report = ablation
    finished = sorted(p for arm in ARMS for p in [*(out / "data" / arm).glob("*.tfrecord*"),
                                                 out / "eval" / arm / "summary.json"])
    before = {p: p.stat().st_mtime_ns for p in finished}
    metrics = {arm: (out / "runs" / arm / "metrics.jsonl").read_text() for arm in ARMS}
    monkeypatch.chdir(ROOT)
    assert run_ablation(config, out, log=lambda _: None) == report
    assert {p: p.stat().st_mtime_ns for p in finished} == before
    assert {arm: (out / "runs" / arm / "metrics.jsonl").read_text() for arm in ARMS} == metrics


def test_ruler_through_the_harness_joins_the_report(ablation, tmp_path, monkeypatch, capfd):
    """harness_tasks added to a finished ablation: RULER as lm-eval runs it on each arm's last step, from tasks
    lm-eval generates once, in eval/ARM/ruler.json and a table of the report; nothing else is redone (two arms
    here)."""
    import dataclasses

    import re

    import lm_eval.tasks

    from nextlong_eval.ablation import RULER_LENGTHS

    # The lengths lm-eval's RULER tasks report a metric for (the others include niah_single_1's list).
    yaml = (Path(lm_eval.tasks.__file__).parent / "ruler" / "niah_single_1.yaml").read_text()
    assert tuple(int(n) for n in re.findall(r'metric: "(\d+)"', yaml)) == RULER_LENGTHS
    config, out, report_path = ablation
    arms = ("nextlong", "plain-concat")
    config = dataclasses.replace(config, arms=arms, harness_tasks=("niah_single_1",), harness_lengths=(4096,),
                                 harness_samples=2)
    finished = {arm: (out / "eval" / arm / "summary.json").stat().st_mtime_ns for arm in arms}
    original = report_path.read_text()
    monkeypatch.chdir(ROOT)
    try:
        report = run_ablation(config, out, log=lambda _: None).read_text()
        scores = {arm: json.loads((out / "eval" / arm / "ruler.json").read_text()) for arm in arms}
    finally:  # the other tests read the module's run as it was
        for arm in arms:
            (out / "eval" / arm / "ruler.json").unlink(missing_ok=True)
        report_path.write_text(original)
    assert {arm: (out / "eval" / arm / "summary.json").stat().st_mtime_ns for arm in arms} == finished
    # lm-eval wrote the samples once for both arms: one progress bar started (its end may print twice).
    assert capfd.readouterr().err.count("Generating synthetic samples: repeat | 4096:   0%") == 1
    table = report[report.index("RULER through lm-evaluation-harness"):].splitlines()
    assert "| arm | niah_single_1 4K | mean |" in table
    for arm in arms:
        assert list(scores[arm]) == ["niah_single_1"] and list(scores[arm]["niah_single_1"]) == ["4096"]
        score = scores[arm]["niah_single_1"]["4096"]
        assert score in (0, 0.5, 1)  # two samples, each 0 or 1
        assert f"| {arm} | {100 * score:.0f} | {100 * score:.1f} |" in table


def test_a_bad_preset_is_refused_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [nextlong, quest]\n")
    with pytest.raises(ValueError, match="unknown arm"):
        AblationConfig.load(bad)
    bad.write_text("sequence: 3\n")
    with pytest.raises(ValueError, match="unknown key.*sequence"):
        AblationConfig.load(bad)
    bad.write_text("harness_tasks: [niah_single_1]\nharness_lengths: [2048]\n")
    with pytest.raises(ValueError, match=r"harness_lengths among lm-eval's RULER lengths .* \(not \[2048\]\)"):
        AblationConfig.load(bad)
    bad.write_text("harness_tasks: [niah_single_1]\n")
    with pytest.raises(ValueError, match="harness_tasks need harness_lengths"):
        AblationConfig.load(bad)


def test_the_continued_pretraining_preset_starts_from_smollm2_in_its_tokens(smollm2):
    """The paper's setting: the preset's start resolves to SmolLM2 (each arm's --init-from-hf), its data and
    probes are in SmolLM2's tokenizer, and the train preset it names holds SmolLM2's architecture with the
    authors' rope change for 8K -> 64K."""
    from nextlong_jax.train_config import load_config

    config = AblationConfig.load(ROOT / "configs" / "eval" / "ablation-smollm2-64k-h100.yaml")
    assert config.start() == smollm2 and config.tokenizer() == str(smollm2)
    model = load_config(ROOT / config.train_config).model
    hf = json.loads((smollm2 / "config.json").read_text())
    assert (model.vocab_size, model.num_hidden_layers, model.hidden_size, model.tie_word_embeddings) == (
        hf["vocab_size"], hf["num_hidden_layers"], hf["hidden_size"], hf["tie_word_embeddings"])
    assert model.max_position_embeddings == 65536 and model.rope_theta == 16 * 100000.0  # the authors' x16
    scratch = AblationConfig.load(ROOT / "configs" / "eval" / "ablation-micro.yaml")
    assert scratch.start() is None and scratch.tokenizer() == "llama3"
