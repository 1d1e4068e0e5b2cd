"""From each host's rows of a batch to the global, sharded arrays the train step takes."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from nextlong_contract.schema import TRAINING_FEATURES


def host_rows(sharding: NamedSharding, global_shape: tuple[int, int]) -> tuple[int, int]:
    """(index, count): this host's devices hold row block `index` of the batch's `count` equal blocks.

    Hosts with the same block (when the sequence axis spans hosts, say) must read the same data.
    Raises ValueError when the host's rows are not one block.
    """
    spans = sorted({(rows.start or 0, global_shape[0] if rows.stop is None else rows.stop)
                    for rows, *_ in sharding.addressable_devices_indices_map(global_shape).values()})
    start, stop = spans[0][0], max(end for _, end in spans)
    size = stop - start
    if any(a > b for (_, b), (a, _) in zip(spans, spans[1:])) or global_shape[0] % size or start % size:
        raise ValueError(f"host {jax.process_index()} holds batch rows {spans}, not one block: keep the mesh's "
                         "data and fsdp axes over whole hosts")
    return start // size, global_shape[0] // size


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int | None = None
                 ) -> dict[str, jax.Array]:
    """This host's rows of the batch (whole rows: `batch_size` in all, default just these) -> global arrays.

    Passing the global shape lets every device take its own rows and columns from whole local rows,
    which is what hosts sharing rows (the sequence axis spanning hosts) need.
    """
    shape = (batch_size or len(local["input_ids"]), local["input_ids"].shape[1])
    return {k: jax.make_array_from_process_local_data(sharding, local[k], shape) for k in TRAINING_FEATURES}
