"""Document orders for the paper's concatenation baselines; `assemble.concatenated_sequences` packs them.

- plain-concat ("Standard"): the meta-documents in a seeded random order.
- knn-concat (KNN / ICLM): each next document is the current one's nearest unvisited neighbour,
  by the cosine of mean chunk embeddings; a dead end (all near neighbours visited) jumps to the
  next unvisited document of the random order. ICLM walks a whole corpus; here each shard walks
  its own documents, so shards stay independent.
"""

from __future__ import annotations

import numpy as np

NEIGHBOURS = 32  # looked at per step before giving up on the neighbourhood


def document_vectors(chunk_embeddings: np.ndarray, chunk_offsets: np.ndarray, docs: list[int]) -> np.ndarray:
    """Unit mean of each document's chunk embeddings [len(docs), dim] (zero for a chunkless one)."""
    vectors = np.zeros((len(docs), chunk_embeddings.shape[1]), np.float32)
    for row, doc in enumerate(docs):
        chunks = chunk_embeddings[chunk_offsets[doc]:chunk_offsets[doc + 1]]
        if len(chunks):
            vectors[row] = chunks.mean(axis=0)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def knn_walk(vectors: np.ndarray, order: list[int]) -> list[int]:
    """Row indexes of `vectors` in nearest-neighbour-walk order, starting at order[0]."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    visited = np.zeros(len(vectors), bool)
    walk: list[int] = []
    pending = iter(order)
    current = None
    while len(walk) < len(vectors):
        if current is None:
            current = next(i for i in pending if not visited[i])
        visited[current] = True
        walk.append(current)
        _, near = index.search(vectors[current:current + 1], min(NEIGHBOURS, len(vectors)))
        current = next((int(i) for i in near[0] if i >= 0 and not visited[i]), None)
    return walk
