"""Near-duplicate documents of the retrieval corpus: MinHash LSH over token-shingle sets.

Real corpora repeat documents with small changes (mirrors, boilerplate-heavy pages). Before mining,
every document whose estimated Jaccard similarity to an EARLIER one reaches the threshold is marked,
so its chunks never become negatives: the first copy stays usable. Deterministic: documents are
taken in store order and MinHash permutations come from a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from synth.files import temporary_sibling
from synth.overlap import shingles

NUM_PERM = 128
SEED = 1


def near_duplicate_documents(tokens_of_doc, num_docs: int, threshold: float, n: int) -> np.ndarray:
    """bool [num_docs]: documents near-duplicating an earlier one. `tokens_of_doc(d)` gives the token
    chunks of document d; shingles are its token n-grams (never spanning two chunks)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    duplicate = np.zeros(num_docs, bool)
    for doc in tqdm(range(num_docs), desc="corpus near-dedup", unit="doc", leave=False, disable=num_docs < 10_000):
        parts = [shingles(t, n) for t in tokens_of_doc(doc)]
        hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        if not len(hashes):
            continue
        # MinHash wants 32-bit element hashes: fold the 64-bit shingle hashes.
        folded = ((hashes >> np.uint64(32)) ^ (hashes & np.uint64(0xFFFFFFFF))).astype(np.uint32)
        minhash = MinHash(num_perm=NUM_PERM, seed=SEED, hashfunc=int)
        minhash.update_batch(folded.tolist())
        if lsh.query(minhash):
            duplicate[doc] = True
        else:
            lsh.insert(doc, minhash)
    return duplicate


def near_duplicates_path(directory: Path, threshold: float, n: int) -> Path:
    """Where a chunk store's near-duplicate marks are kept: in the store's own directory, found once, so
    every process and worker that makes shards loads them instead of finding them again."""
    return directory / f"near-duplicates-j{threshold}-n{n}.npy"


def write_near_duplicates(corpus, path: Path, threshold: float, n: int) -> None:
    """`near_duplicate_documents` of a chunk store, saved at `path`."""
    marks = near_duplicate_documents(lambda d: [corpus.tokens(c) for c in corpus.doc_chunks(d)],
                                     corpus.num_docs, threshold, n)
    tmp = temporary_sibling(path)
    with open(tmp, "wb") as f:
        np.save(f, marks)
    os.replace(tmp, path)
