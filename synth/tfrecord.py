"""TFRecord output, written to the contract in `nextlong_contract.schema` (also the README's "Output format"),
and read back through the contract's one reader (`nextlong_contract.reader`).

One `tf.train.Example` per training sequence. Shards are named
`PREFIX-00000-of-00008.tfrecord` (`.tfrecord.gz` with GZIP), written under a temporary name and
renamed when complete, so a reader never sees half a shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorflow as tf

from nextlong_contract.reader import parser, read_output
from nextlong_contract.schema import FLOAT_FEATURES, INT_FEATURES, PROVENANCE_FEATURES, stream_sha256
from synth.assemble import Sequence
from synth.files import temporary_sibling


def shard_name(prefix: str, index: int, count: int, compression: str) -> str:
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    return f"{prefix}-{index:05d}-of-{count:05d}{suffix}"


def to_example(sequence: Sequence) -> bytes:
    # Python lists convert into protobuf repeated fields several times faster than numpy arrays.
    feature = {
        name: tf.train.Feature(int64_list=tf.train.Int64List(value=getattr(sequence, name).tolist()))
        for name in INT_FEATURES
    }
    for name in FLOAT_FEATURES:
        feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=getattr(sequence, name).tolist()))
    for name, kind in PROVENANCE_FEATURES.items():
        values = getattr(sequence, name)
        if kind == "bytes":
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))
        elif kind == "int64":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Feature maps serialise in hash order unless asked; sorted keys make shards reproducible
    # across processes (resume must give the same bytes).
    return example.SerializeToString(deterministic=True)


def _options(compression: str) -> tf.io.TFRecordOptions:
    return tf.io.TFRecordOptions(compression_type="GZIP" if compression == "gzip" else "")


def write_shard(path: Path, examples, compression: str) -> tuple[int, str]:
    """Write serialized examples to `path`; returns (count, sha256 of the file).

    The caller writes to a temporary name and renames it once everything that must accompany
    the shard is in place.
    """
    count = 0
    with tf.io.TFRecordWriter(str(path), _options(compression)) as writer:
        for example in examples:
            writer.write(example)
            count += 1
    with open(path, "rb") as f:
        return count, stream_sha256(f)


def write_json(path: Path, value: dict) -> None:
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_dataset(source: str | Path, with_provenance: bool = False) -> tf.data.Dataset:
    """A `tf.data.Dataset` of parsed sequences (see `output_reader.parser`) from an output directory or its
    manifest.json: a local path, or a URL whose shards tf.data reads (gs://)."""
    output = read_output(source)
    dataset = tf.data.TFRecordDataset(list(output.shard_files), compression_type=output.manifest.tf_compression)
    return dataset.map(parser(output.manifest.seq_len, with_provenance), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
