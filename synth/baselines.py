"""Document orders for the paper's concatenation baselines; `assemble.concatenated_sequences` packs them.

- plain-concat ("Standard"): the meta-documents in a seeded random order.
- knn-concat (KNN / ICLM): each next document is the current one's nearest unvisited neighbour,
  by the cosine of mean chunk embeddings; a dead end (all near neighbours visited) jumps to the
  next unvisited document of the random order. ICLM walks a whole corpus; here each shard walks
  its own documents, so shards stay independent.
- keyword-concat (in the spirit of Quest): documents grouped by a shared keyword and each group
  concatenated. Quest has a model write queries for every document and takes keywords from those
  queries; here each document's keyword is its highest TF-IDF word among the shard's documents, so
  no generation model is involved and a document belongs to exactly one group.
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


def keyword_order(texts: list[str], seed: int) -> list[int]:
    """Indexes of `texts` grouped by keyword: groups in a seeded random order, each in input order."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b", sublinear_tf=True)
    try:
        weights = vectorizer.fit_transform(texts)
    except ValueError:  # no word survives (empty or all stop words): one group
        return list(range(len(texts)))
    keywords = np.asarray(weights.argmax(axis=1)).ravel()
    keywords[np.asarray(weights.max(axis=1).todense()).ravel() == 0] = -1  # documents without a word
    groups = np.unique(keywords)
    order = np.random.default_rng(seed).permutation(groups)
    rank = {keyword: position for position, keyword in enumerate(order.tolist())}
    return sorted(range(len(texts)), key=lambda i: (rank[int(keywords[i])], i))
