"""Synthesis benchmark: every figure is a ratio of two things measured side by side in this run.

1. Whole-pipeline tokens/s (hashing embedder, exact index) vs tokenizer-only tokens/s on the same
   text: input tokens (the text read) and output tokens (the sequences written, which repeat
   corpus chunks as negatives).
2. MiniLM chunks/s inside the pipeline (chunk + embed stage) vs bare `SentenceTransformer.encode`
   on the same chunk texts.
3. Each ANN index: queries/s and recall@10 vs exact faiss-flat, on MiniLM chunk embeddings.
4. Peak RSS of whole runs as the corpus grows.

    python bench/synth.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import synth.pipeline  # noqa: E402,F401  (TensorFlow's import is start-up, not throughput)
from synth.cli import main as synth_main  # noqa: E402
from synth.corpus import CorpusSpec, ReadStats, read_documents  # noqa: E402
from synth.tokenizer import load_tokenizer  # noqa: E402


def documents(sample: str, limit: int | None):
    return list(read_documents(CorpusSpec(path=sample, max_docs=limit), ReadStats()))


def run_synth(*args: str) -> float:
    started = time.perf_counter()
    code = synth_main(list(args))
    if code != 0:
        raise SystemExit(f"nextlong-synth {' '.join(args)} failed")
    return time.perf_counter() - started


def bench_pipeline_vs_tokenizer(work: Path, limit: int | None, workers: int) -> None:
    tokenizer = load_tokenizer()
    texts = [d.text for d in documents("sample:pydocs", limit)]
    started = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    tokenize_s = time.perf_counter() - started
    out = work / f"hashing-{workers}"
    pipeline_s = run_synth("--meta", "sample:pydocs", "--out", str(out), "--workers", str(workers),
                           "--embedder", "hashing", "--index", "faiss-flat", "--seq-len", "32768",
                           "--num-shards", "4", *(["--max-meta-docs", str(limit)] if limit else []))
    written = json.loads((out / "manifest.json").read_text())["counts"]["sequences"] * 32768
    print(f"\n[1] {len(texts)} docs, {tokens:,} tokens read, {written:,} tokens written, "
          f"{workers} shard worker(s)")
    print(f"    tokenizer only          : {tokens / tokenize_s:12,.0f} tokens/s")
    print(f"    pipeline, tokens read   : {tokens / pipeline_s:12,.0f} tokens/s "
          f"(ratio {tokenize_s / pipeline_s:.2f}, goal >= 0.5)")
    print(f"    pipeline, tokens written: {written / pipeline_s:12,.0f} tokens/s "
          f"(ratio {written / pipeline_s / (tokens / tokenize_s):.2f})")


def bench_minilm(work: Path, limit: int | None) -> None:
    from synth.chunking import chunk_documents
    from synth.config import ChunkingConfig
    from synth.embed import load_embedder
    from synth.store import build_store

    docs = documents("sample:jargon", limit)
    tokenizer = load_tokenizer()
    embedder = load_embedder("minilm")
    embedder.embed(["warm-up"] * 64)  # first-call set-up belongs to neither side
    chunking = ChunkingConfig("tokens", 256)
    started = time.perf_counter()
    ref, stats = build_store(iter(docs), work / "minilm-store", tokenizer, chunking, embedder,
                             512, "bench")
    store = ref.open()
    inside_s = time.perf_counter() - started
    texts = [c.text for cs in chunk_documents([d.text for d in docs], 256, "tokens", tokenizer)
             for c in cs]
    started = time.perf_counter()
    bare = embedder.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    bare_s = time.perf_counter() - started
    assert np.allclose(bare, store.embeddings, atol=1e-4)
    print(f"\n[2] MiniLM on {len(texts)} chunks of <= 256 tokens")
    print(f"    bare SentenceTransformer.encode : {len(texts) / bare_s:8.1f} chunks/s")
    print(f"    pipeline chunk+embed stage      : {len(texts) / inside_s:8.1f} chunks/s")
    print(f"    ratio                           : {bare_s / inside_s:.2f}  (goal >= 0.9)")


def minilm_embeddings(work: Path, limit: int | None) -> np.ndarray:
    """MiniLM vectors of the Jargon File and of Python-docs sections, 128-token chunks."""
    from synth.config import ChunkingConfig
    from synth.embed import load_embedder
    from synth.store import build_store

    tokenizer, embedder = load_tokenizer(), load_embedder("minilm")
    parts = []
    for sample in ("sample:jargon", "sample:pydocs"):
        ref, _ = build_store(iter(documents(sample, limit)), work / f"ann-{sample[7:]}",
                             tokenizer, ChunkingConfig("tokens", 128), embedder, 512, sample)
        parts.append(ref.open().embeddings)
    return np.concatenate(parts)


def bench_indexes(embeddings: np.ndarray, queries: int = 1000) -> None:
    from synth.index import INDEX_KINDS, IndexConfig, build_index, exact_search, recall_at_k

    rng = np.random.default_rng(0)
    held_out = rng.choice(len(embeddings), size=min(queries, len(embeddings) // 5), replace=False)
    mask = np.ones(len(embeddings), bool)
    mask[held_out] = False
    base, query = embeddings[mask], embeddings[held_out]
    print(f"\n[3] ANN indexes: {len(base)} MiniLM vectors (dim {base.shape[1]}), "
          f"{len(query)} queries, k=10")
    started = time.perf_counter()
    _, exact = exact_search(base, query, 10)
    flat_qps = len(query) / (time.perf_counter() - started)
    print(f"    {'index':12s} {'build s':>8s} {'QPS':>10s} {'vs flat':>8s} {'recall@10':>10s}")
    for kind in INDEX_KINDS:
        started = time.perf_counter()
        index = build_index(base, IndexConfig(kind=kind))
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        _, ids = index.search(query, 10)
        qps = len(query) / (time.perf_counter() - started)
        print(f"    {kind:12s} {build_s:8.2f} {qps:10,.0f} {qps / flat_qps:8.2f} "
              f"{recall_at_k(ids, exact, 10):10.3f}")


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's.
RSS_CHILD = """
import re, sys
sys.path.insert(0, {root!r})
from synth.cli import main
code = main({args!r})
status = open("/proc/self/status").read()
print("RSS", re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), code)
"""


def bench_rss(work: Path, sizes: list[int]) -> None:
    print("\n[4] peak RSS vs corpus size (hashing embedder, flat index, fresh process each)")
    for size in sizes:
        args = ["--meta", "sample:pydocs", "--max-meta-docs", str(size), "--out",
                str(work / f"rss-{size}"), "--embedder", "hashing", "--seq-len", "32768",
                "--num-shards", "4"]
        child = subprocess.run([sys.executable, "-c", RSS_CHILD.format(root=str(ROOT), args=args)],
                               capture_output=True, text=True)
        line = [l for l in child.stdout.splitlines() if l.startswith("RSS")]
        if not line:
            raise SystemExit(child.stderr[-2000:])
        print(f"    {size:6d} docs: peak RSS {int(line[0].split()[1]) / 1024:8.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small slices, for a smoke run")
    parser.add_argument("--parts", default="1234", help="which measurements to run (default 1234)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "4" in args.parts:  # first, while this process is small
            bench_rss(work, [250, 500] if args.quick else [1000, 2000, 4000])
        if "1" in args.parts:
            for workers in (1, 2):
                bench_pipeline_vs_tokenizer(work, 300 if args.quick else None, workers)
        if "2" in args.parts:
            bench_minilm(work, 200 if args.quick else None)
        if "3" in args.parts:
            bench_indexes(minilm_embeddings(work, 150 if args.quick else 1500))


if __name__ == "__main__":
    main()
