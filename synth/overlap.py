"""Does a candidate negative repeat text of its own meta-document? Token-shingle containment.

Embedding cosine against the query chunk misses two leaks that real, undeduplicated corpora
have: the same text under another id (a page installed twice) and boilerplate shared by many
documents, retrieved for m_i while it copies m_{i+1}; the model would then read m_{i+1} before
m_{i+1} and learn to copy rather than to bridge the distance. So a candidate is compared with
EVERY chunk of the meta-document: the share of its token n-grams that occur anywhere in the
meta-document (containment, exact over hashed shingles) above a threshold rejects it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash below is a bijection per width


def shingles(tokens: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the token n-grams of `tokens`; a text shorter than n is one shingle."""
    tokens = np.asarray(tokens, np.uint64)
    if len(tokens) == 0:
        return np.zeros(0, np.uint64)
    width = min(n, len(tokens))
    windows = np.lib.stride_tricks.sliding_window_view(tokens, width)
    powers = _MULTIPLIER ** np.arange(width, dtype=np.uint64)  # wraps mod 2^64, as intended
    with np.errstate(over="ignore"):
        hashes = (windows * powers).sum(axis=1, dtype=np.uint64)
    return np.unique(hashes)


class MetaOverlap:
    """Containment of corpus chunks in a meta-document; candidate shingles are cached (LRU)."""

    def __init__(self, chunk_tokens: Callable[[int], np.ndarray], n: int, threshold: float, cache_size: int = 65536):
        self.chunk_tokens, self.n, self.threshold = chunk_tokens, n, threshold
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def document(self, chunk_tokens: Iterable[np.ndarray]) -> np.ndarray:
        """The shingle set of a meta-document, from its chunks' tokens (n-grams never span two chunks)."""
        parts = [shingles(t, self.n) for t in chunk_tokens]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def _chunk_shingles(self, chunk: int) -> np.ndarray:
        cached = self._cache.get(chunk)
        if cached is None:
            cached = self._cache[chunk] = shingles(self.chunk_tokens(chunk), self.n)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(chunk)
        return cached

    def containment(self, chunk: int, document: np.ndarray) -> float:
        """Share of the chunk's shingles found in the document's (0 for an empty chunk)."""
        own = self._chunk_shingles(chunk)
        if not len(own) or not len(document):
            return 0.0
        return float(np.isin(own, document, assume_unique=True).mean())

    def repeats(self, chunk: int, document: np.ndarray) -> bool:
        return self.containment(chunk, document) >= self.threshold
