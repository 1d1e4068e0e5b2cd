"""Which meta-documents are extended. A meta-document of one chunk becomes `[m_1, n_1..n_k]`: no
meta-chunk follows the negatives, so there is no long-range dependency to learn. Documents with
fewer than `min_chunks` chunks are therefore skipped, or (`merge`) joined with the next short
documents of the same input file until the group has enough chunks; a group still short when its
file ends is skipped too.

Groups are made from the meta store alone, in reading order, so every shard worker derives the same
ones; group `g` belongs to shard `g % num_shards`, a skipped document `d` to shard `d % num_shards`
(where it is counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from synth.store import ChunkStore


@dataclass(frozen=True)
class MetaGroups:
    groups: tuple[tuple[int, ...], ...]  # meta-store documents extended together as one meta-document
    skipped: np.ndarray  # documents left out as too short

    def skipped_in_shard(self, shard: int, num_shards: int) -> int:
        return int(np.count_nonzero(self.skipped % num_shards == shard))


def meta_groups(store: ChunkStore, min_chunks: int, merge: bool) -> MetaGroups:
    counts = np.diff(store.doc_chunk_offsets).tolist()
    groups: list[tuple[int, ...]] = []
    skipped: list[int] = []
    pending: list[int] = []  # short documents of the current file, waiting for enough chunks
    for doc, chunks in enumerate(counts):
        if pending and store.doc_sources[doc] != store.doc_sources[pending[0]]:
            skipped += pending
            pending = []
        if chunks >= min_chunks:
            groups.append((doc,))
        elif not merge or chunks == 0:
            skipped.append(doc)
        else:
            pending.append(doc)
            if sum(counts[d] for d in pending) >= min_chunks:
                groups.append(tuple(pending))
                pending = []
    skipped += pending
    return MetaGroups(tuple(groups), np.asarray(sorted(skipped), np.int64))
