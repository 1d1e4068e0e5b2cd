"""Synthesis benchmark: every figure is a ratio of two things measured side by side in this run.

1. Whole-pipeline tokens/s (hashing embedder, exact index) vs tokenizer-only tokens/s on the same
   text: input tokens (the text read) and output tokens (the sequences written, which repeat
   corpus chunks as negatives).
2. MiniLM chunks/s inside the pipeline (chunk + embed stage) vs bare `SentenceTransformer.encode`
   on the same chunk texts.
3. Each ANN index: queries/s and recall@10 vs exact faiss-flat, on MiniLM chunk embeddings.
4. Peak RSS of whole runs as the corpus grows.
5. Hardness and leaks of the negatives with the own-document text rule off, on, and on with corpus
   near-dedup (MiniLM, the bundled Python docs as meta-documents AND corpus, so shared boilerplate
   can leak): cosine of placed negatives, rejections by reason, and how much of the negatives'
   text repeats their own meta-document (share of 8-grams; meta-chunks copied whole).
6. Layout on the bundled corpus at 8K (256-token chunks) and 128K (2048-character chunks, the
   paper's unit), MiniLM: the share of tokens that are meta-chunk text, the share of the used
   meta-documents' tokens that reach a sequence (the rest is cut where a sequence ends), segments
   whose meta-document is one chunk (no dependency to bridge), meta-documents skipped as too short,
   and the cosine of placed negatives; at 128K for headroom 1.0 and 1.5. Computed from the shards
   themselves (re-chunking each listed meta-document), so any version of the pipeline can be compared.

    python bench/synth.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

import synth.local_runner  # noqa: E402,F401  (TensorFlow's import is start-up, not throughput)
from synth.cli import main as synth_main  # noqa: E402
from synth.corpus import CorpusSpec, ReadStats, read_documents  # noqa: E402
from nextlong_contract.tokenizer import load_tokenizer  # noqa: E402


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


def _leaks(out: Path, texts: dict[str, str], chunk_tokens: int) -> tuple[float, int]:
    """(share of negative-token 8-grams found in their segment's own meta-document, meta-chunks of
    that document found verbatim among the segment's negatives)."""
    from synth.chunking import chunk_document
    from synth.overlap import shingles
    from synth.tfrecord import read_dataset

    tokenizer = load_tokenizer()
    shared = total = copies = 0
    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator():
        seg = ex["segment_ids"]
        for meta, segment in zip((m.decode() for m in ex["meta_doc_ids"]), np.unique(seg[seg > 0])):
            idx = np.flatnonzero(seg == segment)
            negatives = ex["input_ids"][idx][ex["token_roles"][idx] == 2].astype(np.int64)
            chunks = [np.asarray(c.ids, np.int64) for c in chunk_document(texts[meta], chunk_tokens, "tokens",
                                                                           tokenizer)]
            own = np.unique(np.concatenate([shingles(c, 8) for c in chunks]))
            grams = shingles(negatives, 8)
            shared += int(np.isin(grams, own).sum())
            total += len(grams)
            stream = negatives.tobytes()
            # int64 tokens: a match at an offset that is not a multiple of 8 bytes is no token match
            copies += sum(len(c) >= 8 and stream.find(c.tobytes()) >= 0 and stream.find(c.tobytes()) % 8 == 0
                          for c in chunks)
    return shared / max(total, 1), copies


def bench_leaks(work: Path, limit: int) -> None:
    print(f"5. negatives' hardness and leaks: {limit} Python-docs sections as meta-documents; MiniLM")
    docs = documents("sample:pydocs", limit)
    texts = {d.id: d.text for d in docs}
    mirrored = work / "mirrored.jsonl"  # the corpus a real crawl gives: every page twice, under two ids
    mirrored.write_text("".join(json.dumps({"id": f"{prefix}{d.id}", "text": d.text}) + "\n"
                                for prefix in ("", "mirror/") for d in docs))
    for corpus_name, corpus in (("corpus = the same sections", []), ("corpus = the sections twice (mirror ids)",
                                                                     ["--corpus", str(mirrored)])):
        print(f"  {corpus_name}:")
        common = ["--meta", "sample:pydocs", "--max-meta-docs", str(limit), *corpus, "--embedder", "minilm",
                  "--index", "faiss-flat", "--seq-len", "8192", "--chunk-tokens", "256", "--num-shards", "2",
                  "--cache-dir", str(work / "leak-cache")]
        for name, extra in (("text rule off", ["--overlap-threshold", "2"]), ("text rule on (default)", []),
                            ("rule on + corpus near-dedup 0.8", ["--corpus-dedup", "0.8"])):
            out = work / f"{corpus_name}-{name}".replace(" ", "-")
            with contextlib.redirect_stdout(io.StringIO()):
                seconds = run_synth(*common, "--out", str(out), *extra)
            negatives = json.loads((out / "manifest.json").read_text())["counts"]["negatives"]
            share, copies = _leaks(out, texts, 256)
            print(f"    {name}: {negatives['chosen']} negatives placed, cosine mean {negatives['similarity_mean']} "
                  f"p10/p50/p90 {negatives['similarity_p10_p50_p90']}; rejected {negatives['filtered']}; "
                  f"negative 8-grams from their own meta-document {100 * share:.2f}%, meta-chunks copied whole "
                  f"{copies}; {seconds:.0f} s", flush=True)


LAYOUTS = (  # (name, flags)
    ("8K, 256-token chunks", ["--seq-len", "8192", "--chunk-tokens", "256"]),
    ("128K, 2048-char chunks", ["--seq-len", "131072", "--chunk-chars", "2048", "--max-sequences", "16"]),
)


def _layout_figures(out: Path, texts: dict[str, str], unit: str, size: int) -> dict:
    from synth.chunking import chunk_document
    from synth.tfrecord import read_dataset

    tokenizer = load_tokenizer()
    summary = json.loads((out / "manifest.json").read_text())["counts"]
    listed: list[str] = []
    roles = np.zeros(3, np.int64)
    segments = 0
    for ex in read_dataset(out, with_provenance=True).as_numpy_iterator():
        listed += [m.decode() for m in ex["meta_doc_ids"]]
        roles += np.bincount(ex["token_roles"], minlength=3)
        segments += len(np.unique(ex["segment_ids"][ex["segment_ids"] > 0]))
    chunks = {doc: [len(c.ids) for c in chunk_document(texts[doc], size, unit, tokenizer)] for doc in set(listed)}
    offered = sum(sum(chunks[doc]) for doc in listed)
    # Meta-role tokens are the chunks' own tokens plus one BOS per segment and any joiner tokens.
    joiners = summary.get("joiner_tokens", {}).get("meta", 0)
    kept = int(roles[1]) - segments - joiners
    return {"meta_share": roles[1] / max(roles[1:].sum(), 1), "kept": kept / max(offered, 1),
            "one_chunk": sum(len(chunks[doc]) == 1 for doc in listed), "segments": segments,
            "skipped": summary.get("meta_documents_skipped"), "cosine": summary["negatives"]["similarity_mean"],
            "sequences": summary["sequences"]}


def bench_layout(work: Path, limit: int, headrooms: tuple[float, ...]) -> None:
    print(f"\n[6] layout: {limit} Python-docs sections extended with Jargon File negatives; MiniLM, exact search")
    texts = {d.id: d.text for d in documents("sample:pydocs", limit)}
    for name, flags in LAYOUTS:
        unit, size = ("chars", int(flags[flags.index("--chunk-chars") + 1])) if "--chunk-chars" in flags else \
            ("tokens", int(flags[flags.index("--chunk-tokens") + 1]))
        for headroom in headrooms:
            out = work / f"layout-{unit}-{size}-{headroom}"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run_synth("--meta", "sample:pydocs", "--max-meta-docs", str(limit), "--corpus", "sample:jargon",
                          "--embedder", "minilm", "--index", "faiss-flat", "--num-shards", "2",
                          "--headroom", str(headroom), "--cache-dir", str(work / "layout-cache"), "--out", str(out),
                          *flags)
            f = _layout_figures(out, texts, unit, size)
            print(f"    {name}, headroom {headroom}: {f['sequences']} sequences, {f['segments']} segments; meta share "
                  f"{100 * f['meta_share']:.1f}%, meta tokens kept {100 * f['kept']:.1f}%, one-chunk meta-documents "
                  f"{f['one_chunk']} of {f['segments']} segments, skipped as too short {f['skipped']}, negative "
                  f"cosine {f['cosine']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small slices, for a smoke run")
    parser.add_argument("--parts", default="123456", help="which measurements to run (default 123456)")
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
        if "5" in args.parts:
            bench_leaks(work, 60 if args.quick else 300)
        if "6" in args.parts:
            bench_layout(work, 60 if args.quick else 300, (1.0, 1.5))


if __name__ == "__main__":
    main()
