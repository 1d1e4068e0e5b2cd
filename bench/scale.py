"""Synthesis at scale, measured side by side on this machine (issue: corpus-scale synthesis).

1. Embedding throughput: the JAX encoder (`--embed-backend jax`) vs sentence-transformers (torch) on
   the same bundled chunks, same model (MiniLM), same window; chunks/s of each and their ratio, and
   the lowest cosine between the two sides' vectors.

    python bench/scale.py [--chunks N] [--repeats R]

Only part 1 exists so far; the Beam runner and the sharded index build are not written yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # With libtpu and the CUDA plugin installed, jax would probe for those chips first.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def chunk_texts(limit: int) -> list[str]:
    from synth.chunking import chunk_document
    from synth.corpus import CorpusSpec, ReadStats, read_documents
    from synth.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    texts: list[str] = []
    for doc in read_documents(CorpusSpec("sample:pydocs"), ReadStats()):
        texts += [c.text for c in chunk_document(doc.text, 256, "tokens", tokenizer)]
        if len(texts) >= limit:
            return texts[:limit]
    return texts


def bench_encoders(chunks: int, repeats: int) -> None:
    import jax

    from synth.embed import EmbeddingConfig, load_embedder

    texts = chunk_texts(chunks)
    sides = {"torch": load_embedder("minilm"), "jax": load_embedder("minilm", EmbeddingConfig(backend="jax"))}
    vectors = {name: side.embed(texts) for name, side in sides.items()}  # warm-up: jax compiles its buckets here
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):  # alternating, so load from elsewhere hits both alike
        for name, side in sides.items():
            start = time.perf_counter()
            side.embed(texts)
            best[name] = min(best[name], time.perf_counter() - start)
    cosine = float((vectors["torch"] * vectors["jax"]).sum(1).min())
    rates = {name: len(texts) / seconds for name, seconds in best.items()}
    print(f"1. MiniLM on {len(texts)} chunks (window 256), {len(jax.local_devices())} {jax.default_backend()} "
          f"device(s): jax {rates['jax']:.1f} chunks/s, torch {rates['torch']:.1f} chunks/s, "
          f"ratio {rates['jax'] / rates['torch']:.2f}; lowest cosine jax vs torch {cosine:.7f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_encoders(args.chunks, args.repeats)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
