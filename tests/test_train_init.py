"""`nextlong-train --init-from-hf`: a warm start through the conversion code keeps the HF weights
exactly (checked by training with learning rate 0 and exporting the checkpoint back to HF)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from nextlong_jax.testing import hf_model, tiny_hf_dict

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             rope_theta=500000.0, max_position_embeddings=512)
OVERRIDES = ["train.steps=1", "checkpoint.every=1", "data.batch_size=1", "model.hidden_size=32",
             "model.intermediate_size=64", "optimizer.learning_rate=0.0"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    done = _run("-m", "synth.cli", "--meta", "sample:pydocs", "--max-meta-docs", "8",
                "--embedder", "hashing", "--seq-len", "512", "--chunk-tokens", "64",
                "--num-shards", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _weights(directory: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_warm_start_keeps_the_hf_weights(data, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_model(tiny_hf_dict(**SHAPE)).save_pretrained(hf_dir, safe_serialization=True)
    run = tmp_path / "run"
    trained = _run("-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml",
                   "--data", str(data), "--out", str(run), "--init-from-hf", str(hf_dir), *OVERRIDES)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    exported = tmp_path / "exported"
    converted = _run("-m", "nextlong_jax.convert_cli", "orbax-to-hf", "--ckpt",
                     str(run / "checkpoints" / "1"), "--out", str(exported))
    assert converted.returncode == 0, converted.stderr[-2000:]
    original, roundtrip = _weights(hf_dir), _weights(exported)
    assert set(roundtrip) <= set(original) and "model.embed_tokens.weight" in roundtrip
    for name, tensor in roundtrip.items():
        np.testing.assert_array_equal(tensor, original[name].astype(tensor.dtype), err_msg=name)


def test_warm_start_with_another_architecture_is_one_line_error(data, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_model(tiny_hf_dict(**{**SHAPE, "hidden_size": 48})).save_pretrained(
        hf_dir, safe_serialization=True)
    failed = _run("-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml",
                  "--data", str(data), "--out", str(tmp_path / "run"), "--init-from-hf", str(hf_dir),
                  *OVERRIDES)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr
    assert "hidden_size" in failed.stderr.strip().splitlines()[-1]


def _checkpoint_items(step_dir: Path) -> dict[str, dict]:
    """params and opt_state of a checkpoint step as flat {path: numpy array}."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    for item in ("params", "opt_state"):
        tree = ocp.PyTreeCheckpointer().restore((step_dir / item).resolve())
        out[item] = {jax.tree_util.keystr(path): np.asarray(leaf)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    return out


def test_init_from_a_checkpoint_takes_parameters_not_optimizer_state(data, tmp_path):
    """The 64K -> 512K chain in small: a second stage started from the first stage's step 2 has
    exactly its parameters (learning rate 0 keeps them through one step) and a fresh optimizer
    (Adam's step count 1, not 3)."""
    first, second = tmp_path / "first", tmp_path / "second"
    def train(out: Path, init_from: Path | None, *overrides: str) -> subprocess.CompletedProcess:
        start = ["--init-from", str(init_from)] if init_from else []
        return _run("-m", "nextlong_jax.train_cli", "--config", "configs/train/tiny-cpu.yaml", "--data", str(data),
                    "--out", str(out), *start, *OVERRIDES, *overrides)

    done = train(first, None, "train.steps=2", "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=0")
    assert done.returncode == 0, done.stderr[-2000:]
    done = train(second, first / "checkpoints" / "2", "model.rope_theta=1000000.0")
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = _checkpoint_items(first / "checkpoints" / "2"), _checkpoint_items(second / "checkpoints" / "1")
    assert before["params"].keys() == after["params"].keys()
    for name, value in before["params"].items():
        np.testing.assert_array_equal(after["params"][name], value, err_msg=name)
    counts = {k: int(v) for k, v in after["opt_state"].items() if k.endswith("['count']")}
    assert counts and set(counts.values()) == {1}, counts
    assert {int(v) for k, v in before["opt_state"].items() if k.endswith("['count']")} == {2}

    wrong = train(tmp_path / "third", first / "checkpoints" / "2", "model.intermediate_size=96")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "intermediate_size: config 96" in wrong.stderr.strip().splitlines()[-1]
