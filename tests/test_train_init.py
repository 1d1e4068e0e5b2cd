"""Warm starts. A run trains the model it starts from, the config changing only its context settings;
`--init-from-hf` through the conversion code keeps the HF weights exactly (checked by training with
learning rate 0 and exporting the checkpoint back to HF); data in another model's tokens is refused;
`--init-from STEP --init-optimizer` carries parameters and Adam's state to a run on another mesh,
with a fresh schedule and step."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import train_in_process
from multidevice import run_on_8_devices
from nextlong_jax.model.config import LlamaConfig, RopeScaling
from nextlong_jax.testing import hf_model, tiny_hf_dict
from nextlong_jax.train_setup import TrainError

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             rope_theta=500000.0, max_position_embeddings=512)
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
OVERRIDES = ["train.steps=1", "checkpoint.every=1", "data.batch_size=1", "model.hidden_size=32",
             "model.intermediate_size=64", "optimizer.learning_rate=0.0"]


def _in_process(capsys, *flags: str, overrides: tuple[str, ...] = ()) -> tuple[int, str]:
    """At OVERRIDES' size (then `overrides`): the exit code and the last line of stderr."""
    run = train_in_process(capsys, ["--config", "configs/train/tiny-cpu.yaml", *flags, *OVERRIDES, *overrides])
    err = run.stderr.strip()
    return run.returncode, err.splitlines()[-1] if err else ""


def _weights(directory: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_warm_start_keeps_the_hf_weights(train_data, tmp_path, capsys):
    from nextlong_jax.convert_cli import main as convert

    hf_dir = tmp_path / "hf"
    hf_model(tiny_hf_dict(**SHAPE)).save_pretrained(hf_dir, safe_serialization=True)
    run = tmp_path / "run"
    trained = train_in_process(capsys, ["--config", "configs/train/tiny-cpu.yaml", "--data", str(train_data),
                                        "--out", str(run), "--init-from-hf", str(hf_dir), *OVERRIDES])
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    exported = tmp_path / "exported"
    assert convert(["orbax-to-hf", "--ckpt", str(run / "checkpoints" / "1"), "--out", str(exported)]) == 0
    original, roundtrip = _weights(hf_dir), _weights(exported)
    assert set(roundtrip) <= set(original) and "model.embed_tokens.weight" in roundtrip
    for name, tensor in roundtrip.items():
        np.testing.assert_array_equal(tensor, original[name].astype(tensor.dtype), err_msg=name)


def test_a_warm_start_trains_the_model_it_starts_from():
    """Its architecture and special ids whatever the config says, each key the config lost named; the
    config's rope_theta, its rope scaling where of the model's type, and the longer context."""
    from nextlong_jax.train_config import load_config
    from nextlong_jax.warm_start import MODEL_FIELDS, start_notes, started_model

    configured = load_config(ROOT / "configs/train/tiny-cpu.yaml", ["model.dropout_rate=0.1"]).model
    model = started_model(SMOLLM2, configured, 4096)
    assert {f: getattr(model, f) for f in MODEL_FIELDS} == {f: getattr(SMOLLM2, f) for f in MODEL_FIELDS}
    assert (model.rope_theta, model.max_position_embeddings, model.dropout_rate) == (500000.0, 8192, 0.1)
    assert start_notes(SMOLLM2, configured, model) == (
        "rope_theta 100000 -> 500000 (config); vocab_size 49152 (model; config 128256); hidden_size 576 (model; "
        "config 64); intermediate_size 1536 (model; config 192); num_hidden_layers 30 (model; config 2); "
        "num_attention_heads 9 (model; config 4); num_key_value_heads 3 (model; config 2); head_dim 64 (model; "
        "config 16); rms_norm_eps 1e-05 (model; config 1e-06); bos_token_id 1 (model; config 128000); "
        "eos_token_id 2 (model; config 128001); max_position_embeddings 8192 (model; config 512)")
    same = started_model(SMOLLM2, SMOLLM2, 8192)
    assert start_notes(SMOLLM2, SMOLLM2, same) == "the config's architecture is the model's"

    llama31 = SMOLLM2.replace(rope_scaling=RopeScaling("llama3", factor=8.0))
    assert started_model(llama31, configured, 512).rope_scaling == llama31.rope_scaling  # the config has none
    longer = RopeScaling("llama3", factor=32.0)
    extended = started_model(llama31, configured.replace(rope_scaling=longer, max_position_embeddings=65536), 65536)
    assert (extended.rope_scaling, extended.max_position_embeddings) == (longer, 65536)
    linear = configured.replace(rope_scaling=RopeScaling("linear", factor=4.0))
    kept = started_model(SMOLLM2, linear, 512)
    assert kept.rope_scaling is None
    assert "rope_scaling none (model; config rope_type=linear,factor=4)" in start_notes(SMOLLM2, linear, kept)
    with pytest.raises(TrainError, match=r"^data.seq_len=16384 is longer than max_position_embeddings \(the "
                                         r"model's 8192, the config's 512\): to extend the context set "
                                         r"model.max_position_embeddings=16384"):
        started_model(SMOLLM2, configured, 16384)


def test_data_the_model_cannot_read_and_a_short_context_are_one_line_errors(train_data, tmp_path, capsys):
    """The tiny model's 311 ids against data in Llama-3's: refused by the manifest, or without one
    by the ids of the first batch; a tokenizer of its own against the manifest's; a context shorter
    than the data's sequences."""
    import tokenizers

    hf_dir = tmp_path / "hf"
    hf_model(tiny_hf_dict()).save_pretrained(hf_dir, safe_serialization=True)
    start = ("--out", str(tmp_path / "run"), "--init-from-hf", str(hf_dir))
    code, last = _in_process(capsys, "--data", str(train_data), *start)
    assert code == 1 and last == (f"nextlong-train: error: {train_data}: its tokenizer llama3 has 128256 ids, more "
                                  "than the model's vocab_size 311: re-synthesize the data with the model's "
                                  "tokenizer (nextlong-synth --tokenizer MODEL_DIR)"), last
    code, last = _in_process(capsys, "--data", str(train_data / "*.tfrecord"), *start)
    assert code == 1 and re.fullmatch(r"nextlong-train: error: the batch of step 1: token id \d+ is beyond the "
                                      r"model's vocab_size 311: re-synthesize .*", last), last

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(311)}, unk_token="w0"))
    words.save(str(hf_dir / "tokenizer.json"))
    code, last = _in_process(capsys, "--data", str(train_data), *start)
    assert code == 1 and last == (f"nextlong-train: error: {train_data}: its token ids are tokenizer llama3's, not "
                                  f"those of the model's tokenizer {hf_dir}: re-synthesize the data with "
                                  f"--tokenizer {hf_dir}"), last

    code, last = _in_process(capsys, "--data", str(train_data), *start,
                             overrides=("model.max_position_embeddings=256",))
    assert code == 1 and last.startswith("nextlong-train: error: data.seq_len=512 is longer than "
                                         "max_position_embeddings (the model's 128, the config's 256)"), last


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    """{path as strings: array}, alike for a tree restored with or without its structure (dict keys,
    tuple indexes and NamedTuple fields all become strings)."""
    import jax

    def name(key):
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
    return {tuple(map(name, path)): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _checkpoint_items(step_dir: Path) -> dict[str, dict]:
    """params and opt_state of a checkpoint step, flat (`_flat`), read as numpy arrays by the saved
    structure alone (on any number of devices)."""
    import jax
    import orbax.checkpoint as ocp

    def read(path: Path):
        checkpointer = ocp.PyTreeCheckpointer()
        saved = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))

    return {item: _flat(read((step_dir / item).resolve())) for item in ("params", "opt_state")}


def _counts(opt_state: dict[tuple[str, ...], np.ndarray]) -> dict[str, int]:
    """Adam's update count and the schedule's, from a flat optax.chain(clip, adamw) state."""
    counts = {path: int(v) for path, v in opt_state.items() if path[-1] == "count"}
    assert len(counts) == 2, counts
    return {"adam" if path[:2] == ("1", "0") else "schedule": count for path, count in counts.items()}


@pytest.fixture(scope="module")
def stage_one(train_data, tmp_path_factory) -> Path:
    """The first stage in small: two steps on 8 devices (fsdp 4 x tensor 2); its step 2 is warm-started
    below on other meshes."""
    out = tmp_path_factory.mktemp("stage-one") / "run"
    run_on_8_devices(__file__, "stage-one", str(train_data), str(out))
    return out / "checkpoints" / "2"


def _stage_one(data: str, out: str) -> None:
    from nextlong_jax.train_cli import main

    assert main(["--config", str(ROOT / "configs/train/tiny-cpu.yaml"), "--data", data, "--out", out, *OVERRIDES,
                 "train.steps=2", "data.batch_size=4", "mesh.fsdp=4", "mesh.tensor=2", "optimizer.learning_rate=1e-2",
                 "optimizer.warmup_steps=0"]) == 0


def test_init_optimizer_carries_adam_state_to_another_mesh(stage_one):
    """Right after init, before any step, on an fsdp-8 mesh: with --init-optimizer Adam's mu, nu and
    count are the (fsdp 4, tensor 2) checkpoint's, resharded; the schedule's count is 0. Without it the
    optimizer is fresh. (After a step the moments would have moved even at learning rate 0.)"""
    assert "init optimizer ok" in run_on_8_devices(__file__, str(stage_one))


def _child(ckpt: Path) -> None:
    import jax

    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.train_config import load_config
    from nextlong_jax.train_setup import build, build_mesh
    from nextlong_jax.warm_start import initial_state

    config = load_config(ROOT / "configs/train/tiny-cpu.yaml", [
        "data.source=unused", *OVERRIDES, "data.batch_size=8", "mesh.fsdp=8"])
    mesh = build_mesh(config)
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        carried = initial_state(setup, config, init_from=ckpt, init_optimizer=True)
        fresh = initial_state(setup, config, init_from=ckpt)
    saved = _checkpoint_items(ckpt)
    got, new = _flat(carried.opt_state), _flat(fresh.opt_state)
    assert got.keys() == saved["opt_state"].keys() == new.keys()
    assert _counts(saved["opt_state"]) == {"adam": 2, "schedule": 2}
    assert _counts(got) == {"adam": 2, "schedule": 0} and _counts(new) == {"adam": 0, "schedule": 0}
    moments = [path for path in got if path[2] in ("mu", "nu")]
    assert len(moments) == 2 * len(saved["params"])
    for path in moments:
        np.testing.assert_array_equal(got[path], saved["opt_state"][path], err_msg=str(path))
        assert not new[path].any(), path
    for path, value in _flat(carried.params).items():
        np.testing.assert_array_equal(value, saved["params"][path], err_msg=str(path))
    # Laid out on the new mesh as its own fresh state is (q_proj's heads no longer split over `tensor`).
    assert jax.tree.map(lambda x: x.sharding, carried) == setup.state_shardings
    q = carried.opt_state[1][0].mu["layers"]["attn"]["q_proj"]
    assert dict(q.sharding.mesh.shape)["fsdp"] == 8 and q.sharding.shard_shape(q.shape)[2] == q.shape[2]
    print("init optimizer ok")


def test_init_optimizer_on_the_cli_continues_adam_and_restarts_the_schedule(train_data, stage_one, tmp_path, capsys):
    """The 64K -> 512K chain in small, on one device from an 8-device checkpoint: after one step at
    learning rate 0 the parameters are the first stage's exactly, Adam has counted 2 + 1 updates, the
    schedule 1, and the run's first checkpoint is step 1."""
    second = tmp_path / "second"
    done = train_in_process(capsys, ["--config", "configs/train/tiny-cpu.yaml", "--data", str(train_data), "--out",
                                     str(second), "--init-from", str(stage_one), "--init-optimizer", *OVERRIDES,
                                     "model.rope_theta=1000000.0"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"model from {stage_one}: rope_theta 500000 -> 1000000 (config)\n" in done.stdout
    assert "Adam's moments and update count from" in done.stdout
    before, after = _checkpoint_items(stage_one), _checkpoint_items(second / "checkpoints" / "1")
    assert before["params"].keys() == after["params"].keys()
    for name, value in before["params"].items():
        np.testing.assert_array_equal(after["params"][name], value, err_msg=str(name))
    assert _counts(after["opt_state"]) == {"adam": 3, "schedule": 1}


def test_warm_start_mismatches_are_one_line_errors(train_data, stage_one, tmp_path, capsys):
    """--init-optimizer without --init-from; an optimizer state of another structure (as another
    optimizer, optax.sgd's momentum say, would save)."""
    code, last = _in_process(capsys, "--data", str(train_data), "--out", str(tmp_path / "alone"), "--init-optimizer")
    assert code == 1 and last == "nextlong-train: error: --init-optimizer goes with --init-from RUN/checkpoints/STEP"

    import orbax.checkpoint as ocp

    other = tmp_path / "other" / "2"
    shutil.copytree(stage_one, other)
    shutil.rmtree(other / "opt_state")
    ocp.PyTreeCheckpointer().save((other / "opt_state").resolve(), {"trace": np.zeros(3)})
    code, last = _in_process(capsys, "--data", str(train_data), "--out", str(tmp_path / "misfit"), "--init-from", str(other),
                             "--init-optimizer")
    assert code == 1 and last.startswith(f"nextlong-train: error: --init-optimizer {other.resolve()}: its optimizer "
                                         "state does not fit"), last


if __name__ == "__main__":
    _stage_one(*sys.argv[2:]) if sys.argv[1] == "stage-one" else _child(Path(sys.argv[1]))
