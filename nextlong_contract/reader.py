"""The one reader of a synthesis output, by the contract in `nextlong_contract.schema`: its manifest found,
its shards checked against the manifest, its records parsed.

An output is named by its directory or its manifest.json, as a local path or as a URL of any
filesystem Apache Beam reads (gs://, s3://, ...: `pip install 'nextlong-jax[beam]'` with that
filesystem's extra), where the Beam runner writes one. Training (`nextlong_jax.data`),
`nextlong-synth inspect` and `synth.tfrecord.read_dataset` all read through here, so shards at a URL
are checked as local ones are. TensorFlow is imported only to parse records, Beam only for URLs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nextlong_contract.schema import (FLOAT_FEATURES, INT_FEATURES, MANIFEST, PROVENANCE_FEATURES, Manifest,
                                      ManifestError, stream_sha256)
from nextlong_contract.urls import is_url, url_filesystems


@dataclass(frozen=True)
class Output:
    manifest: Manifest
    manifest_path: str  # a local path or a URL

    @property
    def shard_files(self) -> tuple[str, ...]:
        """Where the manifest's shards are: beside it, as local paths or URLs."""
        if is_url(self.manifest_path):
            root = self.manifest_path.rsplit("/", 1)[0]
            return tuple(f"{root}/{shard.file}" for shard in self.manifest.shards)
        root = Path(self.manifest_path).parent
        return tuple(str(root / shard.file) for shard in self.manifest.shards)


def names_output(source: str) -> bool:
    """Whether `source` names an output (its directory or manifest.json) rather than shard files (a glob,
    or one .tfrecord file)."""
    if source.endswith(".json"):
        return True
    if is_url(source):  # an object store has no directories to ask about: whatever is not shard files
        return not re.search(r"[*?\[]|\.tfrecord(\.gz)?$", source)
    return Path(source).is_dir()


def read_output(source: str | Path) -> Output:
    """The output at `source` (its directory or manifest.json), its manifest read and its version checked."""
    source = str(source)
    manifest_path = source if source.endswith(".json") else _join(source, MANIFEST)
    if not _exists(manifest_path):
        raise ManifestError(f"{manifest_path} not found: not a synthesis output, or its run has not finished")
    try:
        with _open(manifest_path) as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{manifest_path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{manifest_path}: not a synthesis manifest (not a JSON object)")
    return Output(Manifest.from_dict(data, manifest_path), manifest_path)


def check_shards(output: Output, verify_sha256: bool = False) -> None:
    """Every listed shard is present with the size (and, if asked, the sha256) the manifest states.

    A copy cut short by an interrupted transfer is caught here, before anything reads it.
    """
    for shard, location in zip(output.manifest.shards, output.shard_files):
        if not _exists(location):
            raise ManifestError(f"shard {location} is listed in {MANIFEST} but missing")
        size = _size(location)
        if shard.bytes is not None and size != shard.bytes:
            raise ManifestError(f"shard {location} is {size} bytes but {MANIFEST} says {shard.bytes}: an incomplete "
                                "or altered copy; copy it again")
        if verify_sha256:
            with _open(location) as f:
                if stream_sha256(f) != shard.sha256:
                    raise ManifestError(f"shard {location} does not match the sha256 in {MANIFEST}: corrupted; "
                                        "copy it again")


def feature_spec(seq_len: int, with_provenance: bool = True) -> dict:
    """`tf.io.parse_single_example`'s spec of the contract's features: [seq_len] tensors, and the
    variable-length provenance (sparse) unless left out."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([seq_len], tf.int64) for name in INT_FEATURES}
    spec.update({name: tf.io.FixedLenFeature([seq_len], tf.float32) for name in FLOAT_FEATURES})
    if with_provenance:
        kinds = {"bytes": tf.string, "int64": tf.int64, "float32": tf.float32}
        spec.update({name: tf.io.VarLenFeature(kinds[kind]) for name, kind in PROVENANCE_FEATURES.items()})
    return spec


def parser(seq_len: int, with_provenance: bool = False):
    """Parses one serialized example into a dict of dense tensors. Provenance features (variable
    length) are dropped unless asked for, so that the rest batch as dense [seq_len] tensors."""
    import tensorflow as tf

    spec = feature_spec(seq_len, with_provenance)

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
                for k, v in example.items()}

    return parse


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else str(Path(directory) / name)


def _filesystems():
    return url_filesystems(ManifestError)


def _exists(location: str) -> bool:
    return _filesystems().exists(location) if is_url(location) else Path(location).is_file()


def _size(location: str) -> int:
    if is_url(location):
        return _filesystems().match([location])[0].metadata_list[0].size_in_bytes
    return Path(location).stat().st_size


def _open(location: str) -> BinaryIO:
    if not is_url(location):
        return open(location, "rb")
    from apache_beam.io.filesystem import CompressionTypes

    return _filesystems().open(location, compression_type=CompressionTypes.UNCOMPRESSED)
