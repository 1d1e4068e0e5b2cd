import numpy as np
import tensorflow as tf

from nextlong_contract.reader import feature_spec
from nextlong_contract.schema import MANIFEST, Manifest, ShardEntry
from synth.assemble import Sequence
from synth.tfrecord import read_dataset, shard_name, to_example, write_json, write_shard


def _sequence(rng, seq_len, n_neg):
    return Sequence(
        input_ids=rng.integers(0, 128_256, seq_len),
        loss_weights=rng.random(seq_len).astype(np.float32),
        token_roles=rng.integers(0, 3, seq_len),
        segment_ids=rng.integers(0, 4, seq_len),
        positions=np.arange(seq_len),
        meta_doc_ids=["doc/ä", "doc-2"],
        negative_chunk_ids=[f"n#{i}" for i in range(n_neg)],
        piece_starts=sorted(rng.choice(seq_len, 2 * n_neg, replace=False).tolist()),
        negative_scores=rng.random(n_neg).astype(np.float32).tolist(),
    )


def test_shards_parse_back_with_plain_tf_data(tmp_path):
    rng = np.random.default_rng(0)
    seq_len = 300
    written = [_sequence(rng, seq_len, n) for n in (0, 1, 5)]
    for compression in ("none", "gzip"):
        out = tmp_path / compression
        out.mkdir()
        name = shard_name("nextlong", 0, 1, compression)
        count, digest = write_shard(out / name, (to_example(s) for s in written), compression)
        assert count == 3 and len(digest) == 64
        assert not list(out.glob("*.tmp"))
        entry = ShardEntry(name, count, digest, (out / name).stat().st_size)
        write_json(out / MANIFEST, Manifest(seq_len, compression, (entry,)).to_dict())
        # Plain tf.data + tf.io.parse_single_example, as any trainer would read them.
        raw = tf.data.TFRecordDataset([str(out / name)],
                                      compression_type="GZIP" if compression == "gzip" else "")
        for record, expected in zip(raw, written):
            parsed = tf.io.parse_single_example(record, feature_spec(seq_len))
            for field in ("input_ids", "token_roles", "segment_ids", "positions"):
                np.testing.assert_array_equal(parsed[field].numpy(), getattr(expected, field))
            np.testing.assert_array_equal(parsed["loss_weights"].numpy(), expected.loss_weights)
            ids = [v.decode() for v in tf.sparse.to_dense(parsed["negative_chunk_ids"]).numpy()]
            assert ids == expected.negative_chunk_ids
            metas = [v.decode() for v in tf.sparse.to_dense(parsed["meta_doc_ids"]).numpy()]
            assert metas == expected.meta_doc_ids
            assert tf.sparse.to_dense(parsed["piece_starts"]).numpy().tolist() == expected.piece_starts
            assert tf.sparse.to_dense(parsed["negative_scores"]).numpy().tolist() == expected.negative_scores
        batches = list(read_dataset(out).batch(2).as_numpy_iterator())
        assert [b["input_ids"].shape for b in batches] == [(2, seq_len), (1, seq_len)]
        np.testing.assert_array_equal(batches[1]["input_ids"][0], written[2].input_ids)


def test_writer_and_reader_share_one_contract():
    """Synthesis writes through the objects of `nextlong_contract.schema`, and every reader of an output
    (training, `read_dataset`, `inspect`) finds, checks and parses it through `nextlong_contract.reader`."""
    import nextlong_jax.data as training
    import nextlong_contract.reader as reader
    import nextlong_contract.schema as schema
    import synth.assemble as packer
    import synth.inspect as inspect
    import synth.stages as stages
    import synth.tfrecord as writer

    assert writer.INT_FEATURES is reader.INT_FEATURES is schema.INT_FEATURES
    assert writer.FLOAT_FEATURES is reader.FLOAT_FEATURES is schema.FLOAT_FEATURES
    assert stages.Manifest is reader.Manifest is schema.Manifest
    assert writer.read_output is training.read_output is inspect.read_output is reader.read_output
    assert writer.parser is training.parser is inspect.parser is reader.parser
    assert packer.segment_starts is training.segment_starts is schema.segment_starts
    assert (packer.ROLE_META, packer.ROLE_NEGATIVE) == (schema.ROLE_META, schema.ROLE_NEGATIVE) == (1, 2)
