"""Training input: TFRecord shards written by synthesis -> per-host numpy batches.

What the shards hold is the contract in `nextlong_contract.schema`, read through `nextlong_contract.reader`;
provenance features are ignored. No shard is trusted blindly: against a manifest, local or at a URL,
every shard's size (and on request its sha256) is checked before step 1; without one, a shard that
fails to read mid-run is named, with the record where it broke, instead of surfacing as TensorFlow's
traceback.

Order is a pure function of (files, seed): files are shuffled per epoch, read interleaved, and
records pass a seeded shuffle buffer. Resuming skips the records already consumed, before parsing,
so a restarted run sees exactly the batches an uninterrupted one would.

A source whose manifest declares `document_len` (documents in slots, see `nextlong_contract.schema`)
trains as rows of that length, at that length's attention cost (each `Batch` says its length). A
mixture of sources with different document lengths then draws whole batches per source, not
sequences, so every batch has one document length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from nextlong_contract.reader import check_shards, names_output, parser, read_output
from nextlong_contract.schema import FLOAT_FEATURES, ROLE_NEGATIVE, TRAINING_FEATURES, ManifestError, segment_starts
from nextlong_jax.train_config import DataConfig


SOURCE = "source"  # per sequence: which of the mixture's sources it came from


class DataError(ValueError):
    """A user-facing problem with the dataset."""


@dataclass(frozen=True)
class Shards:
    files: tuple[str, ...]
    compression: str  # "" or "GZIP", as tf.data spells it
    document_len: int | None = None  # the manifest's: documents in slots of this many tokens
    tokenizer: dict | None = None  # the manifest's record of the tokenizer its ids are of (`nextlong_jax.vocabulary`)


def find_shards(source: str, seq_len: int, verify_sha256: bool = False) -> Shards:
    """Shards from a synthesis output (its directory or manifest.json, a local path or a URL), checked
    against its manifest (`output_reader.check_shards`), or from a glob of .tfrecord(.gz) files."""
    if not source:
        raise DataError("no dataset given (--data GLOB_OR_MANIFEST)")
    if names_output(source):
        try:
            output = read_output(source)
            if output.manifest.seq_len != seq_len:
                raise DataError(f"{output.manifest_path}: sequences are {output.manifest.seq_len} tokens but "
                                f"data.seq_len={seq_len}")
            check_shards(output, verify_sha256)
        except ManifestError as e:
            raise DataError(str(e)) from None
        files, compression = output.shard_files, output.manifest.tf_compression
        document_len, tokenizer = output.manifest.document_len, output.manifest.extra.get("tokenizer")
    else:
        document_len = tokenizer = None
        import tensorflow as tf

        # tf.io.gfile, not glob: pod hosts read shards from object stores (gs://...) as well.
        files = tuple(sorted(tf.io.gfile.glob(source)))
        gz = {f.endswith(".gz") for f in files}
        if len(gz) > 1:
            raise DataError(f"{source}: mixes compressed and uncompressed shards")
        compression = "GZIP" if gz == {True} else ""
    if not files:
        raise DataError(f"no TFRecord shards match {source}")
    return Shards(files, compression, document_len, tokenizer)


def locate_damage(shards: Shards) -> str:
    """'FILE: record N ...' for the first shard that fails to read to its end (a full scan: only run
    once something has already failed), or '' if every shard reads."""
    import tensorflow as tf

    for path in shards.files:
        records = 0
        try:
            for _ in tf.data.TFRecordDataset(path, compression_type=shards.compression):
                records += 1
        except tf.errors.OpError as e:
            return f"{path}: record {records + 1} is unreadable after {records} good ones ({e.message.splitlines()[0]})"
    return ""


def host_shards(shards: Shards, block: int, blocks: int) -> Shards:
    """The files of batch row block `block` of `blocks` (round-robin); hosts of one block read the same."""
    if len(shards.files) < blocks:
        raise DataError(f"{len(shards.files)} shards cannot feed {blocks} hosts reading different rows: "
                        "synthesize more shards")
    return dataclasses.replace(shards, files=shards.files[block::blocks])


def check_first_record(path: str, compression: str, seq_len: int) -> None:
    """Fail at start, naming the file, when its records lack features or have another length."""
    import tensorflow as tf

    try:
        record = next(iter(tf.data.TFRecordDataset(path, compression_type=compression).take(1)), None)
    except tf.errors.OpError as e:
        raise DataError(f"{path}: unreadable TFRecord ({e.message.splitlines()[0]})") from None
    if record is None:
        raise DataError(f"{path}: no records")
    try:
        example = tf.train.Example.FromString(record.numpy())
    except Exception:  # protobuf's DecodeError has no stable import path
        raise DataError(f"{path}: records are not tf.train.Example") from None
    features = example.features.feature
    missing = [name for name in TRAINING_FEATURES if name not in features]
    if missing:
        raise DataError(f"{path}: records lack feature(s) {', '.join(missing)}")
    for name in TRAINING_FEATURES:
        values = features[name].float_list.value if name in FLOAT_FEATURES else features[name].int64_list.value
        if len(values) != seq_len:
            raise DataError(f"{path}: feature {name} has {len(values)} values but data.seq_len={seq_len}")


def _records(shards: Shards, config: DataConfig, index: int):
    """The endless, shuffled record stream of one source; source 0 keeps the seeds of a lone source."""
    import tensorflow as tf

    seed = config.seed + 1000 * index
    files = tf.data.Dataset.from_tensor_slices(list(shards.files))
    files = files.shuffle(len(shards.files), seed=seed, reshuffle_each_iteration=True).repeat()
    records = files.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=shards.compression),
        cycle_length=min(len(shards.files), 8), block_length=1)
    return records.shuffle(config.shuffle_buffer, seed=seed + 1)


def whole_batches(sources: list[Shards]) -> bool:
    """Whether the mixture draws whole batches per source: when their document lengths differ."""
    return len({shards.document_len for shards in sources}) > 1


def _dataset(sources: list[Shards], config: DataConfig, per_host_batch: int, skip_batches: int):
    """Batches of `per_host_batch` sequences, each with `SOURCE`: the index of the source it is from."""
    import tensorflow as tf

    parse_example = parser(config.seq_len)

    def parse(record, source):
        features = {k: tf.cast(v, tf.int32) if v.dtype == tf.int64 else v for k, v in parse_example(record).items()}
        return {**features, SOURCE: source}

    # Records are parsed after the skip: resuming costs reading, not parsing, what was consumed.
    streams = [_records(shards, config, i).map(lambda r, i=i: (r, tf.constant(i, tf.int32)))
               for i, shards in enumerate(sources)]
    weights, seed = list(config.mixture_weights), config.seed + 2

    def mixed(streams):
        # A seeded draw: the mixed stream is a pure function of the seed, the same on every host.
        return streams[0] if len(streams) == 1 else tf.data.Dataset.sample_from_datasets(
            streams, weights=weights, seed=seed)

    if whole_batches(sources):
        batched = [s.batch(per_host_batch, drop_remainder=True) for s in streams]
        records = mixed(batched).skip(skip_batches).unbatch()
    else:
        records = mixed(streams).skip(skip_batches * per_host_batch)
    batches = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = batches.batch(per_host_batch, drop_remainder=True)
    batches = batches.prefetch(config.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return batches.with_options(options)


def apply_negative_weight(batch: dict[str, np.ndarray], weight: float) -> dict[str, np.ndarray]:
    """Re-weight hard-negative tokens; pads and each segment's first token (never predicted) keep 0."""
    seg = batch["segment_ids"]
    negative = (batch["token_roles"] == ROLE_NEGATIVE) & (seg != 0) & ~segment_starts(seg)
    weights = np.where(negative, np.float32(weight), batch["loss_weights"]).astype(np.float32)
    return {**batch, "loss_weights": weights}


class Batch(NamedTuple):
    """One per-host batch: numpy arrays by feature name, and the length of the slots its rows hold their
    documents in (`seq_len` where the source declares none)."""

    rows: dict[str, np.ndarray]
    document_len: int


class BatchIterator:
    """Per-host `Batch`es; `position` is what a checkpoint stores to resume exactly."""

    def __init__(self, sources: Shards | list[Shards], config: DataConfig, per_host_batch: int, *,
                 negative_weight: float | None = None, start_batches: int = 0):
        """`sources`: one source's shards, or one per entry of `config.sources` (a mixture)."""
        sources = [sources] if isinstance(sources, Shards) else list(sources)
        if len(sources) != len(config.mixture_weights):
            raise DataError(f"{len(sources)} sources but {len(config.mixture_weights)} mixture weights")
        for shards in sources:
            for path in shards.files:
                check_first_record(path, shards.compression, config.seq_len)
        self._sources = sources
        self._seq_len = config.seq_len
        self._per_host_batch = per_host_batch
        self._negative_weight = negative_weight
        self.batches = start_batches
        self._it = iter(_dataset(sources, config, per_host_batch, start_batches).as_numpy_iterator())

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        import tensorflow as tf

        try:
            batch = next(self._it)
        except tf.errors.OpError as e:
            where = next(filter(None, map(locate_damage, self._sources)), "") or "one of the shards"
            raise DataError(f"cannot read batch {self.batches + 1}: {where}; re-copy or re-synthesize that "
                            f"shard (error: {e.message.splitlines()[0]})") from None
        self.batches += 1
        source = self._sources[int(batch.pop(SOURCE)[0])]
        document_len = source.document_len or self._seq_len
        if document_len < self._seq_len:
            check_slots(batch["segment_ids"], document_len, source.files[0])
        if self._negative_weight is not None:
            batch = apply_negative_weight(batch, self._negative_weight)
        return Batch(batch, document_len)

    @property
    def position(self) -> dict[str, int]:
        return {"batches": self.batches, "per_host_batch": self._per_host_batch}


def check_slots(segment_ids: np.ndarray, document_len: int, where: str) -> None:
    """Raise unless no document crosses a multiple of `document_len` (padding, segment 0, may)."""
    left, right = segment_ids[:, document_len - 1:-1:document_len], segment_ids[:, document_len::document_len]
    if np.any((left == right) & (left != 0)):
        raise DataError(f"{where}: the manifest declares document_len {document_len}, but a document crosses a "
                        "slot boundary; re-synthesize with this version's --doc-len, or remove document_len "
                        "from the manifest to train on whole rows")


def resume_batches(position: dict[str, int] | None, per_host_batch: int, whole: bool = False) -> int:
    """Batches to skip given a saved position; a changed batch size is honoured only on record boundaries,
    and never where the mixture draws `whole` batches (its draws are per batch)."""
    if not position:
        return 0
    if whole and position["per_host_batch"] != per_host_batch:
        raise DataError(f"cannot resume: the mixture draws whole batches of {position['per_host_batch']} "
                        "sequences per host; keep the batch size of the run being resumed")
    records = position["batches"] * position["per_host_batch"]
    if records % per_host_batch:
        raise DataError(f"cannot resume: {records} records consumed is not a whole number of "
                        f"{per_host_batch}-sequence batches; keep the batch size of the run being resumed")
    return records // per_host_batch
