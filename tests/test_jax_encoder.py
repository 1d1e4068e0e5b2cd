"""The JAX sentence encoder equals sentence-transformers on the bundled MiniLM, on one device or eight."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from multidevice import run_on_8_devices

pytestmark = pytest.mark.multiprocess

CHUNKS = 40


def _texts() -> list[str]:
    from synth.chunking import chunk_document
    from synth.corpus import CorpusSpec, ReadStats, read_documents
    from nextlong_contract.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    docs = read_documents(CorpusSpec("sample:pydocs", max_docs=20), ReadStats())
    return [c.text for d in docs for c in chunk_document(d.text, 256, "tokens", tokenizer)][:CHUNKS]


def _jax_embeddings(batch_per_device: int) -> np.ndarray:
    """Small batches, so the texts span several batches and length buckets."""
    from synth.embed import minilm_path
    from synth.jax_encoder import JaxSentenceEncoder

    return JaxSentenceEncoder(minilm_path(), batch_per_device=batch_per_device).embed(_texts())


def test_jax_encoder_matches_sentence_transformers_and_counts_the_same_window(tmp_path):
    from synth.embed import EmbeddingConfig, load_embedder

    texts = _texts()
    torch_side, jax_side = load_embedder("minilm"), load_embedder("minilm", EmbeddingConfig(backend="jax"))
    want, got = torch_side.embed(texts), _jax_embeddings(8)
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert torch_side.over_window(texts) == jax_side.over_window(texts) > 0  # truncation is exercised
    assert jax_side.window == torch_side.window and jax_side.fingerprint != torch_side.fingerprint
    np.save(tmp_path / "one.npy", got)
    out = run_on_8_devices(__file__, str(tmp_path / "one.npy"))
    assert "8 devices: same" in out


if __name__ == "__main__":  # the 8-device child
    import jax

    one = np.load(sys.argv[1])
    eight = _jax_embeddings(2)  # 16 rows per batch, 2 per device
    np.testing.assert_allclose(eight, one, atol=2e-6)
    print(f"{len(jax.local_devices())} devices: same")
