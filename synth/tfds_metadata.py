"""TFDS metadata over a synthesis output, so `tfds.builder_from_directory(OUT)` reads the shards as
they are (no re-encoding): one `train` split, the features of the contract, and the run's counts
and configuration in the dataset description. Needs `tensorflow-datasets` (the `tfds` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nextlong_contract.reader import read_output
from nextlong_contract.schema import FLOAT_FEATURES, INT_FEATURES, PROVENANCE_FEATURES, ManifestError
from synth.errors import SynthError
from synth.strategies import Strategy


def write_tfds_metadata(out: Path) -> None:
    """Write dataset_info.json and features.json beside the shards of `out`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SynthError("--tfds needs tensorflow-datasets: pip install 'nextlong-jax[tfds]'") from None
    try:
        manifest = read_output(out).manifest
    except ManifestError as e:
        raise SynthError(str(e)) from None
    if manifest.compression != "none":
        raise SynthError("--tfds: TFDS reads uncompressed TFRecords only; synthesize with --compression none")
    strategy = manifest.extra.get("strategy", Strategy.NEXTLONG.value)
    length = manifest.seq_len
    features = tfds.features.FeaturesDict({
        **{name: tfds.features.Tensor(shape=(length,), dtype=np.int64) for name in INT_FEATURES},
        **{name: tfds.features.Tensor(shape=(length,), dtype=np.float32) for name in FLOAT_FEATURES},
        **{name: tfds.features.Sequence(tfds.features.Text() if kind == "bytes" else np.dtype(kind))
           for name, kind in PROVENANCE_FEATURES.items()},
    })
    template = tfds.core.ShardedFileTemplate(data_dir=out, template="{DATASET}-{SHARD_X_OF_Y}.{FILEFORMAT}",
                                             dataset_name=strategy, split="train", filetype_suffix="tfrecord")
    split = tfds.core.SplitInfo(name="train", shard_lengths=[s.sequences for s in manifest.shards],
                                num_bytes=sum(s.bytes or 0 for s in manifest.shards), filename_template=template)
    description = "NExtLong synthesis output.\n\n" + json.dumps(
        {"counts": manifest.extra.get("counts"), "config": manifest.extra.get("config")}, indent=1)
    tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=[split],
                                       filename_template=template, description=description, check_data=True)
