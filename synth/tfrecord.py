"""TFRecord output, written to the contract in `nextlong_jax.schema` (also the README's "Output format").

One `tf.train.Example` per training sequence. Shards are named
`PREFIX-00000-of-00008.tfrecord` (`.tfrecord.gz` with GZIP), written under a temporary name and
renamed when complete, so a reader never sees half a shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorflow as tf

from nextlong_jax.schema import FLOAT_FEATURES, INT_FEATURES, MANIFEST, PROVENANCE_FEATURES, Manifest, file_sha256
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
    return count, file_sha256(path)


def feature_spec(seq_len: int) -> dict:
    spec = {name: tf.io.FixedLenFeature([seq_len], tf.int64) for name in INT_FEATURES}
    spec.update({name: tf.io.FixedLenFeature([seq_len], tf.float32) for name in FLOAT_FEATURES})
    kinds = {"bytes": tf.string, "int64": tf.int64, "float32": tf.float32}
    spec.update({name: tf.io.VarLenFeature(kinds[kind]) for name, kind in PROVENANCE_FEATURES.items()})
    return spec


def parser(seq_len: int, with_provenance: bool = False):
    """Parses one serialized example into a dict of dense tensors. Provenance features (variable
    length) are dropped unless asked for, so that the rest batch as dense [seq_len] tensors."""
    spec = feature_spec(seq_len)
    if not with_provenance:
        spec = {k: v for k, v in spec.items() if k not in PROVENANCE_FEATURES}

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
                for k, v in example.items()}

    return parse


def write_json(path: Path, value: dict) -> None:
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_dataset(source: str | Path, with_provenance: bool = False) -> tf.data.Dataset:
    """A `tf.data.Dataset` of parsed sequences (see `parser`) from an output directory or its manifest.json."""
    source = Path(source)
    manifest_path = source / MANIFEST if source.is_dir() else source
    manifest = Manifest.load(manifest_path)
    files = [str(p) for p in manifest.paths(manifest_path.parent)]
    dataset = tf.data.TFRecordDataset(files, compression_type=manifest.tf_compression)
    return dataset.map(parser(manifest.seq_len, with_provenance), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
