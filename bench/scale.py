"""Synthesis at scale, measured side by side on this machine (issue: corpus-scale synthesis).

1. Embedding throughput: the JAX encoder (`--embed-backend jax`) vs sentence-transformers (torch) on
   the same bundled chunks, same model (MiniLM), same window; chunks/s of each and their ratio, and
   the lowest cosine between the two sides' vectors.

2. The whole pipeline, cold cache: the Beam runner (DirectRunner, 2 worker processes) vs the local
   runner (one process; and two shard workers) on the same bundled meta-documents and corpus with
   MiniLM; seconds of each, their ratio, and whether both wrote the same set of examples.
3. Index at scale: build seconds, peak memory growth while building, bytes on disk, and recall@10
   (against exact search) vs queries/s over a sweep of search depths, for IVF-PQ and ScaNN (and
   exact faiss-flat as the baseline), each in its own process. The vectors are synthetic (clustered
   unit vectors of MiniLM's dimension, 384); 1M by default.

    python bench/scale.py [--chunks N] [--repeats R] [--meta-docs N] [--vectors N] [--parts 1 2 3]

The plan for 1B chunks built on these figures is in README.md ("Synthesis at corpus scale").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
    from nextlong_contract.tokenizer import load_tokenizer

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


def _examples(out: Path) -> set[bytes]:
    import tensorflow as tf

    files = [str(out / shard["file"]) for shard in json.loads((out / "manifest.json").read_text())["shards"]]
    return {record.numpy() for record in tf.data.TFRecordDataset(files)}


def bench_runners(meta_docs: int) -> None:
    """Each runner from a cold cache, as a user runs it: `nextlong-synth` in a fresh process."""
    work = Path(tempfile.mkdtemp(prefix="bench-runners."))
    common = ["--meta", "sample:pydocs", "--corpus", "sample:jargon", "--max-meta-docs", str(meta_docs),
              "--max-corpus-docs", str(4 * meta_docs), "--seq-len", "8192", "--num-shards", "4"]
    runs = {"local": [], "local, 2 shard workers": ["--workers", "2"], "beam, 2 workers": ["--runner", "beam"]}
    seconds = {}
    try:
        for name, extra in runs.items():
            out = work / name.replace(" ", "").replace(",", "-")
            start = time.perf_counter()
            printed = subprocess.run([sys.executable, "-m", "synth.cli", *common, "--out", str(out), *extra],
                                     check=True, capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parents[1]).stdout
            seconds[name] = time.perf_counter() - start
            if name == "local":
                stages = re.search(r"chunking ([\d.]+)s, embedding ([\d.]+)s", printed)
        outs = [work / n.replace(" ", "").replace(",", "-") for n in runs]
        same = all(_examples(o) == _examples(outs[0]) for o in outs[1:])
        counts = json.loads((outs[0] / "manifest.json").read_text())["counts"]
        sequences, chunks = counts["sequences"], sum(c["chunks"] for c in counts["documents"].values())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    local = seconds["local"]
    print(f"2. whole pipeline, {meta_docs} meta-docs + {4 * meta_docs} corpus docs, MiniLM, 8K, {sequences} "
          f"sequences: " + ", ".join(f"{n} {t:.1f}s ({local / t:.2f}x local)" for n, t in seconds.items())
          + f"; same examples: {same}")
    chunking, embedding = float(stages.group(1)), float(stages.group(2))
    rest = local - chunking - embedding
    print(f"   local run by stage: {chunks} chunks; chunking {chunks / chunking:.0f} chunks/s, embedding "
          f"{chunks / embedding:.1f} chunks/s, the rest (start-up, index, mining, writing) {rest:.1f}s = "
          f"{sequences / rest:.2f} sequences/s")


def clustered_vectors(n: int, dim: int, draw: int, centres: int) -> np.ndarray:
    """Unit vectors around fixed random centres, each at its own distance from its centre: clustered
    like text embeddings (near neighbours distinctly nearer than the rest), unlike uniform noise.
    Draws with another `draw` seed come from the same centres (queries for the same collection).
    About 64 vectors per centre: every query has more than k=10 neighbours that are meaningfully near."""
    middle = np.random.default_rng(0).standard_normal((centres, dim), dtype=np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    rng = np.random.default_rng(draw + 1)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        spread = rng.uniform(0.02, 0.08, (rows, 1)).astype(np.float32)
        block = middle[rng.integers(0, centres, rows)] + spread * rng.standard_normal((rows, dim), dtype=np.float32)
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _vm_hwm_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


SWEEPS = {"faiss-flat": ("-", [0]), "faiss-ivfpq": ("nprobe", [1, 4, 16, 64]),
          "scann": ("leaves_to_search", [5, 20, 100, 400])}


def index_child(kind: str, n: int) -> None:
    """Build one index over n synthetic vectors and sweep its search depth; one JSON line."""
    import dataclasses

    from synth.index import IndexConfig, build_index, exact_search, recall_at_k

    dim, k = 384, 10
    vectors = clustered_vectors(n, dim, draw=0, centres=max(1, n // 64))
    queries = clustered_vectors(1000, dim, draw=1, centres=max(1, n // 64))
    _, truth = exact_search(vectors, queries, k)
    # nlist fixed at 1024: the automatic 4*sqrt(n) = 4000 lists would spend most of the build in k-means.
    config = IndexConfig(kind=kind, nlist=1024 if kind == "faiss-ivfpq" else None)
    if kind == "scann":
        from synth.index.scann import _scann

        _scann()  # imports TensorFlow: not part of what the build needs
    Path("/proc/self/clear_refs").write_text("5")  # peak from here on: the build, not the data
    base = _vm_hwm_mib()
    start = time.perf_counter()
    index = build_index(vectors, config)
    build_seconds = time.perf_counter() - start
    peak = _vm_hwm_mib() - base
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "index").rglob("*") if f.is_file())
    knob, values = SWEEPS[kind]
    built_with, sweep = dict(index.params), []
    for value in values:
        if kind == "faiss-ivfpq":
            index = dataclasses.replace(index, config=dataclasses.replace(config, nprobe=value))
        elif kind == "scann":
            index = dataclasses.replace(index, params={**index.params, "leaves_to_search": value})
        index.search(queries[:100], k)  # warm
        start = time.perf_counter()
        _, found = index.search(queries, k)
        sweep.append({knob: value, "recall_at_10": round(recall_at_k(found, truth, k), 4),
                      "qps": round(len(queries) / (time.perf_counter() - start))})
    print(json.dumps({"kind": kind, "vectors": n, "build_s": round(build_seconds, 1),
                      "build_peak_mib_per_million": round(peak / n * 1e6), "disk_mib_per_million": round(
                          disk / 2**20 / n * 1e6), "params": built_with, "sweep": sweep}))


def bench_indexes(n: int) -> None:
    for kind in SWEEPS:
        out = subprocess.run([sys.executable, __file__, "--index-child", kind, "--vectors", str(n)], check=True,
                             capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"3. {kind}, {n} x 384: build {row['build_s']}s, build peak +{row['build_peak_mib_per_million']} MiB "
              f"and disk {row['disk_mib_per_million']} MiB per million vectors, params {row['params']}; "
              + ", ".join(" ".join(f"{k} {v}" for k, v in point.items()) for point in row["sweep"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-docs", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--index-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_child:
        index_child(args.index_child, args.vectors)
        return
    if 1 in args.parts:
        bench_encoders(args.chunks, args.repeats)
    if 2 in args.parts:
        bench_runners(args.meta_docs)
    if 3 in args.parts:
        bench_indexes(args.vectors)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
