import numpy as np
import pytest

from nextlong_contract.schema import ROLE_META, ROLE_NEGATIVE, ROLE_PAD
from synth.assemble import Joiner, Packer, Piece, negative_quota
from synth.negatives import MetaDocument, NegativeFilter, Quota, RandomCandidates, mine
from synth.overlap import MetaOverlap


def _meta(chunk: int, doc: int = 0) -> Piece:
    return Piece("meta", doc, chunk)


def _negative(chunk: int) -> Piece:
    return Piece("corpus", chunk, chunk)  # each its own document


def test_packer_roles_weights_segments_positions():
    packer = Packer(seq_len=12, negative_weight=0.25, bos_id=100, pad_id=0, doc_len=12)
    packer.begin_segment(("doc-a",))
    packer.add(np.array([1, 2]), ROLE_META, _meta(0))
    packer.add(np.array([3, 4, 5]), ROLE_NEGATIVE, _negative(0), ("c#0", 0.5))
    packer.begin_segment(("doc-b",))
    packer.add(np.array([6]), ROLE_META, _meta(1, doc=1))
    seq = packer.take()
    assert seq.input_ids.tolist() == [100, 1, 2, 3, 4, 5, 100, 6, 0, 0, 0, 0]
    assert seq.token_roles.tolist() == [1, 1, 1, 2, 2, 2, 1, 1, 0, 0, 0, 0]
    assert seq.loss_weights.tolist() == [0, 1, 1, .25, .25, .25, 0, 1, 0, 0, 0, 0]
    assert seq.segment_ids.tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0]
    assert seq.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 0, 0, 0, 0]
    assert seq.meta_doc_ids == ["doc-a", "doc-b"]
    assert seq.negative_chunk_ids == ["c#0"] and seq.negative_scores == [0.5]
    assert seq.piece_starts == [1, 3, 7]
    assert packer.stats.tokens_by_role == {"meta": 5, "negative": 3, "pad": 4}


def test_packer_truncates_at_exact_length_and_without_bos_first_token_is_unweighted():
    packer = Packer(seq_len=5, negative_weight=1.0, bos_id=None, pad_id=9, doc_len=5)
    packer.begin_segment(("d",))
    assert packer.add(np.array([1, 2, 3]), ROLE_META, _meta(0)) == 0
    assert packer.add(np.array([4, 5, 6, 7]), ROLE_NEGATIVE, _negative(0)) == 2
    assert packer.full
    seq = packer.take()
    assert seq.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert seq.loss_weights.tolist() == [0, 1, 1, 1, 1]
    assert packer.stats.truncated_tokens == 2
    assert packer.fill == 0 and packer.remaining == 5


def test_weights_are_consistent_with_roles():
    packer = Packer(seq_len=64, negative_weight=0.0, bos_id=7, pad_id=0, doc_len=64)
    rng = np.random.default_rng(0)
    for doc in range(3):
        packer.begin_segment((str(doc),))
        for chunk in range(3):
            packer.add(rng.integers(10, 99, 3), ROLE_META, _meta(chunk, doc))
            packer.add(rng.integers(10, 99, 4), ROLE_NEGATIVE, _negative(chunk))
    seq = packer.take()
    first = np.r_[True, seq.segment_ids[1:] != seq.segment_ids[:-1]] & (seq.segment_ids > 0)
    assert np.all(seq.loss_weights[seq.token_roles == ROLE_NEGATIVE] == 0.0)
    assert np.all(seq.loss_weights[(seq.token_roles == ROLE_META) & ~first] == 1.0)
    assert np.all(seq.loss_weights[first] == 0.0)
    assert np.all(seq.loss_weights[seq.token_roles == ROLE_PAD] == 0.0)
    assert np.all((seq.segment_ids == 0) == (seq.token_roles == ROLE_PAD))


def test_joiner_goes_between_texts_that_do_not_continue_each_other_and_counts_in_the_length():
    """Token 5 stands for a newline; tokens >= 50 end in whitespace. A joiner is put before a chunk of
    another document, or of the same one that does not follow on, unless the text before ends in
    whitespace; it takes the role and weight of the chunk it precedes, and the length stays exact."""
    joiner = Joiner(np.array([5]), lambda token: token >= 50)
    packer = Packer(seq_len=15, negative_weight=0.5, bos_id=100, pad_id=0, doc_len=15, joiner=joiner)
    packer.begin_segment(("d",))
    packer.add(np.array([1, 2]), ROLE_META, _meta(0))       # after BOS: no joiner
    packer.add(np.array([3]), ROLE_META, _meta(1))          # continues chunk 0: none
    packer.add(np.array([7, 60]), ROLE_NEGATIVE, _negative(7))  # another document: joiner, negative
    packer.add(np.array([8]), ROLE_META, _meta(2))          # after whitespace (60): none
    packer.add(np.array([9]), ROLE_META, _meta(4))          # same document, not the next chunk: joiner
    assert packer.add(np.array([10, 11, 12, 13, 14, 15]), ROLE_NEGATIVE, _negative(3)) == 2
    assert packer.full
    seq = packer.take()
    assert seq.input_ids.tolist() == [100, 1, 2, 3, 5, 7, 60, 8, 5, 9, 5, 10, 11, 12, 13]
    assert seq.token_roles.tolist() == [1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2]
    assert seq.loss_weights.tolist() == [0, 1, 1, 1, .5, .5, .5, 1, 1, 1, .5, .5, .5, .5, .5]
    assert packer.stats.joiner_tokens == {"negative": 2, "meta": 1}
    assert packer.stats.meta_tokens_placed == 5 and packer.stats.truncated_tokens == 2
    assert seq.piece_starts == [1, 3, 4, 7, 8, 10]  # a joiner starts the piece it precedes


def test_a_joiner_that_fills_the_segment_cuts_the_whole_chunk():
    packer = Packer(seq_len=4, negative_weight=1.0, bos_id=None, pad_id=0, doc_len=4,
                    joiner=Joiner(np.array([5]), lambda token: False))
    packer.begin_segment(("d",))
    packer.add(np.array([1, 2, 3]), ROLE_META, _meta(0))
    assert packer.add(np.array([8, 9]), ROLE_META, _meta(5)) == 2
    seq = packer.take()
    assert seq.input_ids.tolist() == [1, 2, 3, 5]
    assert seq.piece_starts == [0]  # chunk 5 is not placed: its joiner is no piece
    assert packer.stats.meta_tokens_placed == 3 and packer.stats.joiner_tokens == {"meta": 1}


def test_meta_groups_skip_or_merge_short_documents_within_their_file():
    from types import SimpleNamespace

    from synth.meta_groups import meta_groups

    chunks = [1, 3, 1, 1, 2, 1, 1, 0, 1]
    sources = ["a", "a", "a", "a", "a", "b", "b", "b", "b"]
    store = SimpleNamespace(doc_chunk_offsets=np.cumsum([0, *chunks]), doc_sources=sources)
    skip = meta_groups(store, 2, merge=False)
    assert skip.groups == ((1,), (4,)) and skip.skipped.tolist() == [0, 2, 3, 5, 6, 7, 8]
    assert skip.skipped_in_shard(0, 2) == 4 and skip.skipped_in_shard(1, 2) == 3
    merged = meta_groups(store, 2, merge=True)
    # 0 waits past the long document 1 for 2; 3 is alone when file a ends, 8 when the input ends;
    # 7 has no chunk at all.
    assert merged.groups == ((1,), (0, 2), (4,), (5, 6)) and merged.skipped.tolist() == [3, 7, 8]
    assert meta_groups(store, 1, merge=False).skipped.tolist() == [7]


@pytest.mark.parametrize("room,meta,chunks,fixed,max_k,headroom,expected", [
    (8192, 400, 2, None, None, 1.0, (None, 3896)),  # (8192 - 400) // 2 tokens
    (8192, 400, 2, None, None, 1.5, (None, 5944)),  # the paper's w: (8192 * 1.5 - 400) // 2
    (8192, 13000, 4, None, None, 1.5, (None, 1)),   # too long already: one negative each
    (8192, 400, 2, None, 64, 1.5, (64, 5944)),      # and at most --max-k of them
    (8192, 400, 2, 3, None, 1.5, (3, None)),        # a fixed k is a count
])
def test_negative_quota_is_the_papers_k_times_s_in_tokens(room, meta, chunks, fixed, max_k, headroom, expected):
    quota = negative_quota(room, meta, chunks, fixed, max_k, headroom, np.full(4, 256))
    assert (quota.count, quota.tokens) == expected


def _rules(chunk_doc, tokens=None, **kw):
    overlap = MetaOverlap(lambda c: tokens[c] if tokens else np.arange(c * 100, c * 100 + 20), n=4, threshold=0.5)
    return NegativeFilter(np.asarray(chunk_doc), kw.get("dedup", 0.95), kw.get("max_reuse", 2), overlap)


NOTHING = np.zeros(0, np.uint64)


def test_filter_excludes_own_document_near_duplicates_sample_repeats_and_reuse():
    rules = _rules([0, 0, 1, 2, 3, 4], max_reuse=1)
    scores = np.array([0.99, 0.9, 0.97, 0.8, 0.7, 0.6], np.float32)
    ids = np.array([2, 0, 3, 4, 5, -1])
    in_sample = {5}
    chosen = mine(None, rules, None, Quota(count=3), (scores, ids), MetaDocument(frozenset({0}), NOTHING), in_sample, 6)
    # 2: near-duplicate (0.99 > 0.95); 0: same document; 3 (0.97) near-dup; 4 ok; 5 in sample.
    assert chosen == [(4, pytest.approx(0.8))]
    assert rules.stats.filtered == {"near_duplicate": 2, "same_document": 1,
                                    "already_in_sample": 1, "index_padding": 1}
    assert in_sample == {4, 5}
    assert rules.stats.short_of_k == 1  # the whole corpus (6 chunks) was judged: 1 of 3
    assert rules.stats.chosen == 0  # selected, not yet placed
    rules.place(4, 0.8)
    assert rules.stats.chosen == 1 and rules.reuse[4] == 1
    # Chunk 4 has now been placed max_reuse=1 times.
    again = list(rules.admissible(np.array([0.5], np.float32), np.array([4]), MetaDocument(frozenset(), NOTHING),
                                  set()))
    assert again == [] and rules.stats.filtered["reuse_cap"] == 1


def test_filter_rejects_a_candidate_repeating_any_chunk_of_the_meta_document():
    """Chunk 1 copies the meta-document's SECOND chunk under another document id (so neither the id
    rule nor cosine to the query chunk stops it); chunk 2 shares a boilerplate paragraph with it;
    chunk 3 shares one short phrase, below the threshold."""
    rng = np.random.default_rng(0)
    meta = [rng.integers(0, 5000, 40), rng.integers(0, 5000, 40)]
    boiler = rng.integers(0, 5000, 30)
    tokens = [rng.integers(0, 5000, 40), meta[1].copy(), np.concatenate([boiler, rng.integers(0, 5000, 10)]),
              np.concatenate([meta[0][:6], rng.integers(0, 5000, 34)])]
    rules = _rules([0, 1, 2, 3], tokens)
    own = MetaDocument(frozenset(), rules.overlap.document([meta[0], np.concatenate([meta[1], boiler])]))
    chosen = list(rules.admissible(np.full(4, 0.5, np.float32), np.arange(4), own, set()))
    assert [c for c, _ in chosen] == [0, 3]
    assert rules.stats.filtered == {"repeats_meta_document": 2}
    assert rules.overlap.containment(3, own.shingles) == pytest.approx(3 / 37)  # 3 of its 37 4-grams


def test_mine_widens_the_search_when_filters_exhaust_the_first_pass():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    chunk_doc = np.arange(50) // 10  # five documents of ten chunks
    source = RandomCandidates(emb, np.random.default_rng(1))
    rules = _rules(chunk_doc, dedup=1.01, max_reuse=5)
    first = source.candidates(emb[:1], 4)
    chosen = mine(source, rules, emb[0], Quota(count=12), (first[0][0], first[1][0]),
                  MetaDocument(frozenset({0}), NOTHING), set(), 50)
    chosen = [c for c, _ in chosen]
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert all(chunk_doc[c] != 0 for c in chosen)
    assert rules.stats.short_of_k == 0  # met by searching deeper
    short_rules = _rules(chunk_doc, dedup=1.01)
    short = mine(source, short_rules, emb[0], Quota(count=45),
                 (first[0][0], first[1][0]), MetaDocument(frozenset({0}), NOTHING), set(), 50)
    assert len(short) == 40  # only 40 chunks are outside document 0
    assert short_rules.stats.short_of_k == 1


def test_a_quota_in_tokens_takes_a_prefix_of_the_ranking_that_fits():
    """Negatives of 256 tokens, as the paper's k assumes, take k = budget // 256 of them; longer ones
    fewer. The first candidate that does not fit ends the prefix (no shorter one is sought after it),
    and one longer than the whole budget is still taken alone: k is at least 1."""
    rules = _rules(np.arange(8), dedup=1.01, max_reuse=8)
    ranked = (np.full(8, 0.5, np.float32), np.arange(8))

    def take(lengths, tokens):
        quota = Quota(tokens=tokens, lengths=np.asarray(lengths))
        return [c for c, _ in mine(None, rules, None, quota, ranked, MetaDocument(frozenset(), NOTHING), set(), 8)]

    assert take([256] * 8, 1024) == [0, 1, 2, 3]
    assert take([512, 300, 100, 200, 10, 10, 10, 10], 1024) == [0, 1, 2]
    assert take([512, 600, 10, 10, 10, 10, 10, 10], 1024) == [0]
    assert take([5000, 10, 10, 10, 10, 10, 10, 10], 1024) == [0]
    assert rules.stats.short_of_k == 0  # a budget that ends the prefix is met, not short
    assert take([10] * 8, 1024) == list(range(8))
    assert rules.stats.short_of_k == 1  # 80 of 1024 tokens: the corpus ran out


@pytest.mark.parametrize("max_reuse, shards", [(8, 8), (3, 8), (10, 4), (1, 1)])
def test_run_wide_reuse_cap_splits_exactly_over_shards(max_reuse, shards):
    """Over the run, the shards' allowances for a chunk sum to max_reuse; per shard, each has it all."""
    def allowances(scope):
        return np.array([[NegativeFilter(np.zeros(50), 0.95, max_reuse, None, shard=s, num_shards=shards,
                                         reuse_scope=scope).allowance(c) for s in range(shards)] for c in range(50)])
    run, per_shard = allowances("run"), allowances("shard")
    assert (run.sum(axis=1) == max_reuse).all() and (run.max(axis=1) - run.min(axis=1) <= 1).all()
    assert (per_shard == max_reuse).all()


def test_knn_walk_follows_the_nearest_unvisited_neighbour():
    from synth.baselines import knn_walk

    # Two clusters of points on the unit circle: a walk crosses each cluster in angle order, and
    # moves to the other cluster only once the first is exhausted.
    angles = np.array([0.0, 0.1, 0.25, 0.3, 2.0, 2.05, 2.2])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    assert knn_walk(vectors, [0, 4, 1, 2, 3, 5, 6]) == [0, 1, 2, 3, 4, 5, 6]
    assert knn_walk(vectors, [6, 0, 1, 2, 3, 4, 5]) == [6, 5, 4, 3, 2, 1, 0]


def test_keyword_order_groups_documents_sharing_their_top_keyword():
    from synth.baselines import keyword_order

    topics = ["glacier", "violin", "orchard"]
    texts = [f"the {topics[i % 3]} {topics[i % 3]} story number {'one two three'.split()[i % 3]}" for i in range(9)]
    order = keyword_order(texts, seed=0)
    assert sorted(order) == list(range(9))
    runs = [topics[i % 3] for i in order]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == 2  # three contiguous groups
    assert keyword_order(texts, seed=0) == order and keyword_order(["", "  "], seed=0) == [0, 1]


def test_with_slots_every_document_starts_on_a_slot_boundary():
    """doc_len < seq_len: a short document leaves the rest of its slot as padding, and the next one
    starts on the next multiple of doc_len, so no document crosses a slot boundary."""
    packer = Packer(seq_len=12, negative_weight=1.0, bos_id=100, pad_id=0, doc_len=4)
    for doc, tokens in enumerate(([1, 2], [3, 4, 5, 6, 7], [8])):
        packer.begin_segment((f"d{doc}",))
        packer.add(np.array(tokens), ROLE_META, _meta(doc, doc=doc))
    assert packer.full is False and packer.next_segment_room == 0
    seq = packer.take()
    assert seq.input_ids.tolist() == [100, 1, 2, 0, 100, 3, 4, 5, 100, 8, 0, 0]
    assert seq.segment_ids.tolist() == [1, 1, 1, 0, 2, 2, 2, 2, 3, 3, 0, 0]
    assert seq.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 0, 0]
    assert packer.stats.truncated_tokens == 2  # 6 and 7: the second document's slot was full
