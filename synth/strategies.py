"""The layouts `--strategy` chooses between, and what each needs from the earlier stages.

`nextlong` is the method; the others are the paper's baselines (`synth.baselines` orders the
concatenations, `synth.negatives` draws the random negatives). Every stage asks the strategy what
it needs instead of comparing names: the runners whether to embed chunks and build an index, the
configuration whether `--doc-len` applies, the shard maker how to lay sequences out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum


class Order(Enum):
    """How a concatenation orders a shard's meta-documents (`synth.baselines`)."""

    SHUFFLED = "shuffled"  # the shard's seeded order, as plain concatenation
    KNN_WALK = "knn-walk"  # each document followed by its nearest unvisited neighbour (document vectors)
    KEYWORDS = "keywords"  # documents sharing TF-IDF keywords placed together


class Strategy(StrEnum):
    NEXTLONG = "nextlong"
    RANDOM_NEGATIVES = "random-negatives"
    PLAIN_CONCAT = "plain-concat"
    KNN_CONCAT = "knn-concat"
    KEYWORD_CONCAT = "keyword-concat"

    @property
    def extends(self) -> bool:
        """Meta-documents extended with negatives, several fixed-length documents to a sequence with
        --doc-len and only those of --min-meta-chunks chunks; else whole meta-documents concatenated
        in one segment (a concatenation has no meta-chunks to bridge)."""
        return _NEEDS[self].extends

    @property
    def embeds(self) -> bool:
        """Chunks are embedded: to find negatives, draw their scores, or order documents."""
        return _NEEDS[self].embeds

    @property
    def searches_index(self) -> bool:
        """Negatives come from the corpus index (built, or found in the cache, and its recall measured)."""
        return _NEEDS[self].searches_index

    @property
    def order(self) -> Order:
        """How a concatenation orders its documents (meaningless for strategies that extend)."""
        return _NEEDS[self].order


@dataclass(frozen=True)
class _Needs:
    extends: bool
    embeds: bool
    searches_index: bool
    order: Order = Order.SHUFFLED


_NEEDS = {
    Strategy.NEXTLONG: _Needs(extends=True, embeds=True, searches_index=True),
    Strategy.RANDOM_NEGATIVES: _Needs(extends=True, embeds=True, searches_index=False),  # scored by cosine
    Strategy.PLAIN_CONCAT: _Needs(extends=False, embeds=False, searches_index=False),
    Strategy.KNN_CONCAT: _Needs(extends=False, embeds=True, searches_index=False, order=Order.KNN_WALK),
    Strategy.KEYWORD_CONCAT: _Needs(extends=False, embeds=False, searches_index=False, order=Order.KEYWORDS),
}
