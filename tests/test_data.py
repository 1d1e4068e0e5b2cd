"""TFRecord input: stated errors for bad datasets, exact resume by skipping, negative re-weighting."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from nextlong_jax.data import (BatchIterator, DataError, Shards, apply_negative_weight, check_slots, find_shards,
                               host_shards, resume_batches)
from nextlong_contract.schema import MANIFEST, Manifest, ShardEntry
from nextlong_jax.train_config import DataConfig

SEQ = 16


def _write(path, n, seq_len=SEQ, drop=(), seed=0, segments=None):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    segments = [1] * seq_len if segments is None else segments
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(n):
            f = {name: tf.train.Feature(int64_list=tf.train.Int64List(value=v)) for name, v in (
                ("input_ids", rng.integers(0, 100, seq_len)), ("token_roles", rng.integers(1, 3, seq_len)),
                ("segment_ids", segments), ("positions", range(seq_len)))}
            f["loss_weights"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(i)] * seq_len))
            for name in drop:
                del f[name]
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())


def _write_manifest(root, names, document_len=None):
    entries = tuple(ShardEntry(name, 5, hashlib.sha256((root / name).read_bytes()).hexdigest(),
                               (root / name).stat().st_size) for name in names)
    manifest = Manifest(SEQ, "none", entries, document_len=document_len)
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict()))


@pytest.fixture
def shards(tmp_path):
    for i in range(3):
        _write(tmp_path / f"s-{i}.tfrecord", 5, seed=i)
    _write_manifest(tmp_path, [f"s-{i}.tfrecord" for i in range(3)])
    return tmp_path


def test_glob_manifest_and_dir_find_the_same_shards(shards):
    by_glob = find_shards(str(shards / "*.tfrecord"), SEQ)
    assert find_shards(str(shards), SEQ) == find_shards(str(shards / "manifest.json"), SEQ) == by_glob
    assert host_shards(by_glob, 1, 2).files == (by_glob.files[1],)


def test_bad_inputs_fail_at_start_naming_the_file(shards, tmp_path):
    with pytest.raises(DataError, match="manifest.json: sequences are 16 tokens but data.seq_len=32"):
        find_shards(str(shards), 32)
    with pytest.raises(DataError, match="no TFRecord shards match"):
        find_shards(str(tmp_path / "nothing-*.tfrecord"), SEQ)
    _write(tmp_path / "short.tfrecord", 2, seq_len=8)
    with pytest.raises(DataError, match=r"short.tfrecord: feature input_ids has 8 values but data.seq_len=16"):
        BatchIterator(find_shards(str(tmp_path / "short.tfrecord"), SEQ), DataConfig(seq_len=SEQ), 2)
    _write(tmp_path / "bare.tfrecord", 2, drop=("token_roles", "loss_weights"))
    with pytest.raises(DataError, match=r"bare.tfrecord: records lack feature\(s\) token_roles, loss_weights"):
        BatchIterator(find_shards(str(tmp_path / "bare.tfrecord"), SEQ), DataConfig(seq_len=SEQ), 2)
    with pytest.raises(DataError, match="2 shards cannot feed 3 hosts"):
        host_shards(find_shards(str(tmp_path / "s-[01].tfrecord"), SEQ), 0, 3)


def test_resume_skips_to_exactly_the_same_batches(shards):
    config = DataConfig(seq_len=SEQ, shuffle_buffer=4, seed=3)
    found = find_shards(str(shards), SEQ)
    full = [next(it).rows for it in [BatchIterator(found, config, 2)] for _ in range(12)]  # crosses epochs (15 records)
    resumed = BatchIterator(found, config, 2, start_batches=7)
    for want in full[7:]:
        got, document_len = next(resumed)
        assert document_len == SEQ  # no manifest, so no slots
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.position == {"batches": 12, "per_host_batch": 2}
    assert full[0]["input_ids"].dtype == np.int32 and full[0]["loss_weights"].shape == (2, SEQ)
    assert len({float(b["loss_weights"][0, 0]) for b in full}) > 1  # records really shuffled/interleaved


def test_negative_weight_spares_pads_and_segment_starts():
    batch = dict(segment_ids=np.array([[1, 1, 1, 2, 2, 0]]), token_roles=np.array([[2, 2, 1, 2, 2, 0]]),
                 loss_weights=np.array([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]], np.float32))
    out = apply_negative_weight(batch, 0.25)
    np.testing.assert_array_equal(out["loss_weights"], [[0.0, 0.25, 1.0, 0.0, 0.25, 0.0]])


def _read_all(shards, source, **data):
    iterator = BatchIterator(find_shards(str(source), SEQ, **data), DataConfig(seq_len=SEQ, shuffle_buffer=1), 2)
    for _ in range(20):  # 15 records per pass: the damaged one is reached
        next(iterator)


def test_a_cut_shard_fails_in_one_line_naming_the_file(shards):
    """As an interrupted copy to a bucket leaves it: caught by size before step 1 with a manifest;
    without one, the read that fails names the file and the record."""
    path = shards / "s-1.tfrecord"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"^shard \S+s-1.tfrecord is \d+ bytes but manifest.json says \d+: an "
                                        r"incomplete or altered copy; copy it again$"):
        find_shards(str(shards), SEQ)
    with pytest.raises(DataError, match=r"^cannot read batch \d+: \S+s-1.tfrecord: record 3 is unreadable after 2 "
                                        r"good ones \(.*\); re-copy or re-synthesize that shard \(error: .*\)$"):
        _read_all(shards, shards / "*.tfrecord")


def test_flipped_bytes_fail_in_one_line_naming_the_file(shards):
    """Same size, altered content: the manifest's sha256 catches it on request; otherwise the
    record's CRC does, mid-run, and the message names the file."""
    path = shards / "s-2.tfrecord"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last record
    path.write_bytes(bytes(data))
    assert find_shards(str(shards), SEQ).files[2] == str(path)  # sizes agree
    with pytest.raises(DataError, match=r"^shard \S+s-2.tfrecord does not match the sha256 in manifest.json"):
        find_shards(str(shards), SEQ, verify_sha256=True)
    for source in (shards, shards / "*.tfrecord"):
        with pytest.raises(DataError, match=r"^cannot read batch \d+: \S+s-2.tfrecord: record 5 is unreadable"):
            _read_all(shards, source)


def test_manifest_versions_are_checked(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    (shards / MANIFEST).write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(DataError, match=r"manifest.json: manifest format version 9; this reader knows 1, 2"):
        find_shards(str(shards), SEQ)
    old = {**manifest, "format": "nextlong-tfrecord/1"}  # version 1: no sizes, still readable
    del old["format_version"]
    for shard in old["shards"]:
        del shard["bytes"]
    (shards / MANIFEST).write_text(json.dumps(old))
    assert len(find_shards(str(shards), SEQ).files) == 3


def test_an_output_at_a_url_is_checked_as_a_local_one(shards):
    """The manifest at a URL (read through Beam's filesystems; here the stand-in scheme mirror://) is
    found from the output's URL or its manifest's, and every shard is checked against it before step 1."""
    from mirror_filesystem import MirrorFileSystem  # Beam's filesystems (the dev extra): a missing one fails

    url = MirrorFileSystem.PREFIX + str(shards)
    local = find_shards(str(shards), SEQ)
    for source in (url, f"{url}/{MANIFEST}"):
        assert find_shards(source, SEQ, verify_sha256=True) == Shards(
            tuple(MirrorFileSystem.PREFIX + f for f in local.files), local.compression)
    with pytest.raises(DataError, match="manifest.json: sequences are 16 tokens but data.seq_len=32"):
        find_shards(url, 32)
    with pytest.raises(DataError, match=r"^mirror://\S+/elsewhere/manifest.json not found"):
        find_shards(f"{url}/elsewhere", SEQ)

    path = shards / "s-1.tfrecord"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"^shard mirror://\S+s-1.tfrecord is \d+ bytes but manifest.json says \d+"):
        find_shards(url, SEQ)
    flipped = bytearray(whole)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    find_shards(url, SEQ)  # sizes agree
    with pytest.raises(DataError, match=r"^shard mirror://\S+s-1.tfrecord does not match the sha256 in manifest.json"):
        find_shards(url, SEQ, verify_sha256=True)
    path.unlink()
    with pytest.raises(DataError, match=r"^shard mirror://\S+s-1.tfrecord is listed in manifest.json but missing"):
        find_shards(url, SEQ)


def test_a_weighted_mixture_draws_by_its_weights_and_resumes_exactly(tmp_path):
    """Two sources told apart by their loss weights (0..4 and 100..104): a 1:3 mixture gives about a
    quarter of its sequences from the first, and a resumed iterator continues the same stream."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            _write(tmp_path / name / f"s-{i}.tfrecord", 5, seed=i)
    config = DataConfig(source=(str(tmp_path / "a"), str(tmp_path / "b")), weights=(1.0, 3.0), seq_len=SEQ,
                        shuffle_buffer=4, seed=5)
    _mark(tmp_path / "b", 100.0)
    sources = [find_shards(str(tmp_path / name / "*.tfrecord"), SEQ) for name in ("a", "b")]
    full = [next(it).rows for it in [BatchIterator(sources, config, 4)] for _ in range(100)]
    from_b = np.mean([w >= 100 for b in full for w in b["loss_weights"][:, 0]])
    assert abs(from_b - 0.75) < 0.05, from_b
    resumed = BatchIterator(sources, config, 4, start_batches=60)
    for want in full[60:70]:
        np.testing.assert_array_equal(next(resumed).rows["loss_weights"], want["loss_weights"])
    with pytest.raises(ValueError, match=r"weights \[1.0\] must be 2 positive numbers"):
        DataConfig(source=("x", "y"), weights=(1.0,))


def _mark(directory, offset):
    """Rewrite every shard of `directory` with loss weights raised by `offset`."""
    import tensorflow as tf

    for path in sorted(directory.glob("*.tfrecord")):
        records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
        with tf.io.TFRecordWriter(str(path)) as w:
            for example in records:
                values = example.features.feature["loss_weights"].float_list.value
                values[:] = [v + offset for v in values]
                w.write(example.SerializeToString())


def _slotted(root, segments, document_len=4):
    root.mkdir()
    for i in range(2):
        _write(root / f"p-{i}.tfrecord", 5, seed=10 + i, segments=segments)
    _write_manifest(root, [f"p-{i}.tfrecord" for i in range(2)], document_len)
    return root


def test_a_mixture_of_document_lengths_draws_whole_batches_and_resumes_exactly(shards, tmp_path):
    """A source whose manifest declares document_len 4 (documents in slots) beside one that does not:
    every batch comes from one source and says its document length; resuming gives the same batches."""
    packed = find_shards(str(_slotted(tmp_path / "packed", [1, 1, 1, 0, 2, 2, 0, 0, 3, 3, 3, 3, 4, 0, 0, 0])), SEQ)
    whole = find_shards(str(shards), SEQ)
    assert (packed.document_len, whole.document_len) == (4, None)
    config = DataConfig(source=("a", "b"), seq_len=SEQ, shuffle_buffer=4, seed=3)
    it = BatchIterator([whole, packed], config, 2)
    seen = [next(it) for _ in range(12)]
    for batch, length in seen:
        # the packed source's rows have segments 1..4; the other's all 1
        assert (batch["segment_ids"].max() > 1) == (length == 4), batch["segment_ids"]
    assert {length for _, length in seen} == {4, SEQ}
    resumed = BatchIterator([whole, packed], config, 2, start_batches=5)
    for (want, want_length), (got, length) in zip(seen[5:], resumed):
        assert length == want_length
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(DataError, match="draws whole batches of 2 sequences"):
        resume_batches({"batches": 4, "per_host_batch": 2}, 4, whole=True)
    assert resume_batches({"batches": 4, "per_host_batch": 2}, 4) == 2


def test_a_document_crossing_a_declared_slot_is_an_error(tmp_path):
    crossing = find_shards(str(_slotted(tmp_path / "bad", [1] * 6 + [2] * 10)), SEQ)
    with pytest.raises(DataError, match="declares document_len 4, but a document crosses a slot boundary"):
        next(BatchIterator(crossing, DataConfig(seq_len=SEQ), 2))
    # Padding (segment 0) may run on across a boundary: it attends nothing real and weighs nothing.
    check_slots(np.array([[1, 1, 0, 0, 0, 0, 2, 2]]), 4, "ok")
