"""`nextlong-synth`: the command line over `synth.pipeline.run`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from synth.config import FLAT_DEFAULTS, STRATEGIES, build_config
from synth.errors import SynthError
from synth.index import INDEX_KINDS

DESCRIPTION = """\
Turn short documents into long-context training sequences (NExtLong, arXiv 2501.12766).

Each meta-document is cut into chunks; every chunk is followed by its k most similar chunks
of a retrieval corpus (hard negatives), so the meta-document's own dependencies span many
distracting tokens. The result is written as sharded TFRecords with per-token loss weights.
Reruns with the same arguments resume where a killed run stopped.
"""

EPILOG = """\
paths: a JSONL(.gz) / Parquet file, a directory (of text files, JSONL/Parquet files, or a
TFDS dataset), a glob, or a bundled sample: sample:pydocs, sample:jargon.

example:
  nextlong-synth --meta sample:pydocs --corpus sample:jargon --out out/demo --seq-len 8192
  nextlong-synth --config configs/synth/paper.yaml --meta docs.jsonl --out out/paper
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nextlong-synth", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    p.add_argument("--config", type=Path, help="YAML preset (keys as the flags); flags override it")
    io = p.add_argument_group("inputs and output")
    io.add_argument("--meta", help="meta-documents: the short documents to extend")
    io.add_argument("--corpus", help="retrieval corpus for negatives (default: the meta-documents)")
    io.add_argument("--out", help="output directory for shards, manifest.json and summary.md")
    io.add_argument("--meta-format", choices=["auto", "jsonl", "parquet", "text", "tfds"])
    io.add_argument("--corpus-format", choices=["auto", "jsonl", "parquet", "text", "tfds"])
    io.add_argument("--id-field", help="id field of JSONL/Parquet/TFDS records (default: id)")
    io.add_argument("--text-field", help="text field of records (default: text)")
    io.add_argument("--max-meta-docs", type=int, help="read at most this many meta-documents")
    io.add_argument("--max-corpus-docs", type=int, help="read at most this many corpus documents")
    io.add_argument("--max-doc-chars", type=int,
                    help="skip (and count) longer documents (default: 4,000,000)")
    io.add_argument("--strict", action="store_true", default=None,
                    help="fail on the first bad record instead of counting and skipping it")
    io.add_argument("--cache-dir", type=Path,
                    help="chunk, embedding and index cache (default: OUT/.cache)")
    model = p.add_argument_group("tokenizer, chunking, embedding, index")
    model.add_argument("--tokenizer", help="'llama3' (bundled), a tokenizer.json or a HF tokenizer "
                                           "directory; lengths are counted in its tokens")
    model.add_argument("--chunk-tokens", type=int, help="chunk size in tokens (default: 512)")
    model.add_argument("--chunk-chars", type=int,
                       help="chunk size in characters instead (the paper: 2048)")
    model.add_argument("--embedder", help="'minilm' (bundled all-MiniLM-L6-v2), 'hashing[:DIM]', "
                                          "or a local sentence-transformers directory")
    model.add_argument("--embed-device", help="where the embedder runs: cpu (default), cuda, cuda:1, mps, ...")
    model.add_argument("--embed-max-tokens", type=int,
                       help="the encoder's window in its own tokens, up to the positions the model has (default: "
                            "the model's max_seq_length; MiniLM 256). Longer chunks are counted in the summary")
    model.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="allow an embedder that ships its own Python code (e.g. jina-embeddings-v3) to run it")
    model.add_argument("--index", choices=INDEX_KINDS, help="nearest-neighbour index (default: faiss-flat)")
    model.add_argument("--index-param", dest="index_params", action="append", metavar="KEY=VALUE",
                       help="index tuning, repeatable: nlist, nprobe, pq_m (faiss-ivfpq); hnsw_m, ef_search, "
                            "ef_construction (faiss-hnsw); scann_leaves, scann_leaves_to_search (scann). "
                            "Unset ones keep their defaults (nlist, pq_m and the ScaNN leaves follow the "
                            "corpus size). YAML: index-params: {nprobe: 32}")
    mine = p.add_argument_group("negatives and layout")
    mine.add_argument("--strategy", choices=STRATEGIES,
                      help="nextlong (default); the paper's baselines: random-negatives, plain-concat (the "
                           "meta-documents back to back), knn-concat (ordered by a nearest-neighbour walk, as ICLM), "
                           "keyword-concat (grouped by a TF-IDF keyword, in the spirit of Quest)")
    mine.add_argument("--meta-position", choices=["head", "tail", "random"],
                      help="where each meta-chunk goes among its negatives: head (default, the method), tail or "
                           "random (the paper's position ablation)")
    mine.add_argument("--seq-len", type=int, help="tokens per training sequence (default: 32768)")
    mine.add_argument("--doc-len", type=int,
                      help="tokens per extended document, several packed into each --seq-len sequence with "
                           "segment ids (the authors' 512K data: --doc-len 65536 --seq-len 524288); default: one "
                           "document spans the sequence")
    mine.add_argument("--k", help="negatives per meta-chunk, or 'auto' (default): chosen from the "
                                  "lengths to fill --seq-len")
    mine.add_argument("--max-k", help="upper bound of the automatic k (default 'auto': as many as --seq-len "
                                      "can hold, so one meta-document spans the whole sequence)")
    mine.add_argument("--headroom", type=float,
                      help="the paper's w: the automatic k = (seq_len*w - meta tokens) / (meta chunks * "
                           "mean negative tokens), the extended document then cut at --seq-len (default: 1.5)")
    mine.add_argument("--min-segment-tokens", type=int,
                      help="pad the end of a sequence rather than start a meta-document there with less "
                           "room than this (default: 512)")
    mine.add_argument("--negative-weight", type=float,
                      help="loss weight of negative tokens, 0..1 (default 1.0 = the paper)")
    mine.add_argument("--dedup-threshold", type=float,
                      help="drop candidates more similar than this cosine (default: 0.95)")
    mine.add_argument("--overlap-threshold", type=float,
                      help="drop candidates sharing at least this share of their token n-grams with ANY "
                           "chunk of the meta-document (default: 0.5; above 1 turns it off)")
    mine.add_argument("--shingle-tokens", type=int, help="n of those token n-grams (default: 8)")
    mine.add_argument("--corpus-dedup", type=float, metavar="JACCARD",
                      help="near-deduplicate the retrieval corpus first (MinHash LSH over the same n-grams): a "
                           "document this similar to an earlier one never gives negatives (e.g. 0.8; default off)")
    mine.add_argument("--max-reuse", type=int,
                      help="placements of one corpus chunk as a negative (default: 8), over the run or per "
                           "shard as --reuse-scope says")
    mine.add_argument("--reuse-scope", choices=["run", "shard"],
                      help="run (default): at most --max-reuse in all shards together; shard: in each")
    mine.add_argument("--num-shards", type=int, help="output shards (default: 8)")
    mine.add_argument("--max-sequences", type=int,
                      help="stop after this many sequences in all (same budget across strategies)")
    mine.add_argument("--compression", choices=["none", "gzip"], help="TFRecord compression")
    mine.add_argument("--seed", type=int, help="seed of every random choice (default: 0)")
    mine.add_argument("--docs-per-block", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1,
                   help="processes making output shards (default 1); the output is the same")
    return p


def _flat_options(args: argparse.Namespace) -> dict:
    flat: dict = {}
    if args.config is not None:
        if not args.config.is_file():
            raise SynthError(f"config file {args.config} not found")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SynthError(f"{args.config}: expected a mapping of option: value")
        flat.update({str(k).replace("_", "-"): v for k, v in loaded.items()})
    for key in FLAT_DEFAULTS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            flat[key] = value
    return flat


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = build_config(_flat_options(args))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
        from synth.pipeline import run  # heavy imports (TensorFlow, torch) only when running

        if args.workers < 1:
            raise SynthError("--workers must be at least 1")
        summary = run(config, workers=args.workers)
    except SynthError as exc:
        print(f"nextlong-synth: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nextlong-synth: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    from synth.report import render_summary

    print()
    print(render_summary(summary), end="")
    timing = summary["timing"]
    print(f"- time: {timing['seconds']}s (chunking {timing['chunk_seconds']}s, "
          f"embedding {timing['embed_seconds']}s)")
    print(f"- output: {config.output.out}/manifest.json, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
