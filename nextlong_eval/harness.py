"""This stack as an lm-evaluation-harness model (`--model nextlong`): RULER, LongBench and the rest run as
the field runs them, on the training mesh and kernels.

`generate_until` decodes with `nextlong_jax.decode` (prefill sharded over `sequence` as in training);
`loglikelihood` and `loglikelihood_rolling` score continuations with one teacher-forced forward pass
(`Evaluator.continuation_scores`). Tokenization, truncation, stop sequences and post-processing
follow lm-eval's own `hf` model, so that on the same weights both give the same samples.

On a pod every host runs this same program on every request (one SPMD program over the mesh), so each
reports itself to lm-eval as rank 0 of 1; `nextlong-eval harness` lets only process 0 write results.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from nextlong_jax.decode import Sampling
from nextlong_eval.runner import Evaluator

MODEL_NAME = "nextlong"


@register_model(MODEL_NAME)
class NextLongLM(TemplateLM):
    """`config`: the training YAML whose mesh, kernels and dtypes run the model; exactly one of `hf` (an HF
    Llama directory) or `ckpt` (RUN/checkpoints/STEP); `overrides`: its dotted key=value overrides,
    separated by ';'. `tokenizer` defaults to the model's. `batch_size` rounds up to a multiple of the
    mesh's batch shards; `max_length` defaults to the model's max_position_embeddings, as lm-eval's hf."""

    def __init__(self, config: str | None = None, hf: str | None = None, ckpt: str | None = None,
                 tokenizer: str | None = None, overrides: str = "", batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 seed: int = 0, evaluator: Evaluator | None = None, **_lm_eval_extras):
        """`evaluator`: a model already loaded (the ablation's), in place of config + hf/ckpt."""
        super().__init__()
        import transformers

        from nextlong_jax.convert import model_tokenizer
        from nextlong_jax.train_config import load_config

        hf_dir, ckpt_dir = (Path(hf) if hf else None), (Path(ckpt) if ckpt else None)
        if evaluator is None:
            if (hf is None) == (ckpt is None) or config is None:
                raise ValueError("the nextlong model takes config=YAML and exactly one of hf=DIR or "
                                 "ckpt=RUN/checkpoints/STEP")
            loaded = load_config(Path(config), ["data.source=unused", *filter(None, str(overrides).split(";"))])
            evaluator = Evaluator.load(loaded, ckpt=ckpt_dir, hf=hf_dir)
        self.evaluator = evaluator
        spec = tokenizer or model_tokenizer(hf_dir, ckpt_dir)
        if spec is None:
            raise ValueError("no tokenizer beside the model: pass tokenizer=DIR in the model arguments")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
        rows = self.evaluator.rows
        asked = rows if batch_size == "auto" else int(str(batch_size).split(":")[0])
        self._batch_size = -(-max(asked, 1) // rows) * rows
        self._max_length = int(max_length or self.evaluator.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self._decoder = self.evaluator.decoder(self._decode_all, self._batch_size)

    # --- what lm-eval asks of a model --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS, as lm-eval's hf; the model's where the tokenizer names none (a bare
        tokenizer.json)."""
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        eos = self.evaluator.model.config.eos_token_id
        return eos[0] if isinstance(eos, tuple) else eos

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's hf: the tokenizer's own special tokens unless told (`add_bos_token`), and none
        when the text already starts with the BOS."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            special = False
        ids = self.tokenizer.encode(string, **({} if special is None else {"add_special_tokens": special}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _decode_all(self, tokens: list[int]) -> str:
        """What stop strings are looked for in while decoding: special tokens included (an EOS string
        is one of lm-eval's stop sequences)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether greedy decoding would give it, over the
        last max_length + 1 tokens of context + continuation (lm-eval's hf truncation)."""
        pairs = []
        for _, context, continuation in requests:
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            pairs.append((tokens[:len(tokens) - len(continuation)], tokens[len(tokens) - len(continuation):]))
        with tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm) as bar:
            scores = self.evaluator.continuation_scores(pairs, progress=bar)
        out = [(float(logprob.sum()), bool((rank == 0).all())) for logprob, rank in scores]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood in disjoint max_length windows, each after the context lm-eval's
        rolling windows give it (as its hf model)."""
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (string,) = request.args
            windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, decoded until a stop sequence (the EOS string among them) or
        `max_gen_toks`; contexts left-truncated to leave room for it, as lm-eval's hf does."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                budget = kwargs.pop("max_gen_toks")
                if budget >= self.max_length:
                    raise ValueError(f"max_gen_toks {budget} leaves no room for a prompt in max_length "
                                     f"{self.max_length}")
                contexts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - budget)
                            for i in members]
                sampling = Sampling(float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0,
                                    int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0), self.seed)
                done = self._decoder.generate(contexts, budget, stop_ids=[self.eot_token_id], stop_strings=until,
                                              sampling=sampling, progress=bar)
                for i, completion in zip(members, done):
                    text = postprocess_generated_text(self.tok_decode(completion.tokens), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


class RulerTasks:
    """lm-eval's RULER tasks at each length, generated once and asked of every model (lm-eval writes 500
    samples a length, tokenizing each: seconds at 4K, minutes at 64K)."""

    def __init__(self, tasks: tuple[str, ...], tokenizer: str):
        self.tasks, self.tokenizer = tasks, tokenizer
        self._loaded: dict[int, tuple] = {}

    def at(self, length: int) -> tuple:
        """(lm-eval's task manager, the tasks) at `length` tokens."""
        if length not in self._loaded:
            import lm_eval.tasks
            from lm_eval.tasks import TaskManager

            # Indexing only RULER's folder: lm-eval's whole task tree is ~14,000 YAML files (6 s a length).
            manager = TaskManager(include_path=Path(lm_eval.tasks.__file__).parent / "ruler", include_defaults=False,
                                  metadata={"tokenizer": self.tokenizer, "max_seq_lengths": [length]})
            self._loaded[length] = manager, list(manager.load(list(self.tasks))["tasks"].values())
        return self._loaded[length]


def ruler_scores(lm: NextLongLM, ruler: RulerTasks, lengths: tuple[int, ...], samples: int) -> dict[str, dict[str, float]]:
    """RULER as lm-eval runs it: {task: {length: mean score in [0, 1]}}, the first `samples` of each length.
    One evaluation per length, because lm-eval's `limit` takes a task's first documents and RULER's come
    length after length."""
    from lm_eval import simple_evaluate

    scores: dict[str, dict[str, float]] = {task: {} for task in ruler.tasks}
    for length in lengths:
        manager, tasks = ruler.at(length)
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=samples, bootstrap_iters=0)
        for task in ruler.tasks:
            scores[task][str(length)] = float(results["results"][task][f"{length},none"])
    return scores
