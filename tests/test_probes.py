"""`nextlong-eval probes` builds RULER's tasks as RULER writes them: lm-eval's RULER generator gives the
same niah_single_1 and vt text once keys, values and positions are set alike; every task's prompt is
its template around its haystack, fitted to the length less its generation budget, with its gold
strings inside; QA reads SQuAD and HotpotQA files as RULER does; RULER's scoring and the report's
means (of tasks, not probes)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter

import numpy as np
import pytest

from nextlong_eval.probes import (CWE_TEMPLATE, FWE_TEMPLATE, NIAH, NIAH_TEMPLATE, NOISE, QA_TEMPLATE, SYNTHETIC,
                                      VT_TEMPLATE, ProbeFactory, ProbeSpec, fit, lines, niah_prompt, vt_chain,
                                      vt_prompt, vt_with_example)
from nextlong_eval.scoring import generate_verdicts, postprocess, string_match_all, string_match_part

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
# The needle RULER writes: one regex per kind of key and value.
KIND = {"numbers": r"\d{7}", "uuids": UUID, "words": r"[^\s]+(?: [^\s]+)?-[^\s]+(?: [^\s]+)?"}


@pytest.fixture(scope="module")
def essays():
    from nextlong_eval.probes import corpus_texts

    return corpus_texts("sample:pydocs", 300)


@pytest.fixture(scope="module")
def probes(tokenizer, essays):
    return ProbeFactory(ProbeSpec(lengths=(1024, 4096), samples=2), tokenizer, essays).all()


def _needles(prompt: str, kind_v: str) -> list[tuple[str, str]]:
    return re.findall(rf"One of the special magic {kind_v} for (.+?) is: ({KIND[kind_v]})\.", prompt)


def test_every_task_is_its_template_around_a_haystack_fitted_to_the_length(tokenizer, probes):
    assert {p.task for p in probes} == set(SYNTHETIC)
    template = {"vt": VT_TEMPLATE, "cwe": CWE_TEMPLATE, "fwe": FWE_TEMPLATE}
    for p in probes:
        t = template.get(p.task, NIAH_TEMPLATE)
        assert p.prompt_ids == [tokenizer.bos_id] + tokenizer.encode(p.prompt)  # the whole text, tokenized once
        assert p.max_new_tokens == t.tokens_to_generate
        # Fitted: the budget to generate fits, and little more prompt would (a haystack unit at most).
        assert 0 <= p.length - p.max_new_tokens - len(p.prompt_ids) < 80, (p.task, p.length)
        assert all(o in p.prompt for o in p.outputs)
        # The teacher-forced continuation holds the gold strings, each at its span.
        assert [tokenizer.decode(p.answer_ids[a:b]).strip() for a, b in p.gold_spans] == (
            [min(p.outputs, key=len)] if p.task.startswith("qa") else p.outputs)
        assert p.depth is None if p.task in ("cwe", "fwe") else 0 <= p.depth < 1


def test_niah_wording_needles_and_haystacks_are_rulers(probes):
    for p in (p for p in probes if p.task in NIAH):
        args = NIAH[p.task]
        single = args.values * args.queries == 1
        kind = args.value[:-1] if single else args.value
        head = (f"A special magic {kind} is hidden" if single else f"Some special magic {kind} are hidden")
        assert p.prompt.startswith(head + " within the following text. Make sure to memorize it. I will quiz you "
                                   f"about the {kind} afterwards.\n")
        needles = _needles(p.prompt, args.value)
        asked = [k for k, v in needles if v in p.outputs]
        query = asked[0] if len(set(asked)) == 1 else None
        verb = "is" if single else "are"
        tail = re.search(rf"\n{'What is the' if single else 'What are all the'} special magic {kind} for (.+) mentioned in "
                         rf"the provided text\? The special magic {kind} for (.+) mentioned in the provided text {verb}$", p.prompt)
        assert tail and tail[1] == tail[2] and (query is None or tail[1] == query), p.prompt[-300:]
        assert len(p.outputs) == args.values * args.queries and all(re.fullmatch(KIND[args.value], v) for v in p.outputs)
        context = p.prompt.split("\n")[1:-1]
        if args.haystack == "noise":  # RULER's five-sentence block a line, the needle on a line of its own
            assert sorted(set(context)) == sorted({NOISE, *(f"One of the special magic {args.value} for {k} is: {v}."
                                                            for k, v in needles)})
        elif args.haystack == "needle":  # a haystack made of needles, every line one
            assert len(needles) == len(context) > 10 and all(line.startswith("One of the special magic") for line in context)
            assert re.fullmatch(KIND[args.key], needles[0][0])
        else:  # essays: needles between sentences, no noise
            keys = max(args.keys, args.queries)
            assert NOISE not in p.prompt and len(needles) == keys * args.values == len(set(needles))
            assert len({k for k, _ in needles}) == keys


def test_vt_follows_its_example_with_a_chain_of_five_letter_names_from_five_digits(probes):
    for p in (p for p in probes if p.task == "vt"):
        example, question = p.prompt.split("\n\nMemorize and track", 1)
        assert example.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        example_names = re.search(r"they are:  ([A-Z]{3}(?: [A-Z]{3}){4})$", example)[1].split()
        names = p.outputs
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        for text, chain in ((example, example_names), (question, names)):
            context = text.split("\n\n", 1)[1].split("\nQuestion:")[0].split("\n")
            [value] = [m[1] for line in context if (m := re.fullmatch(r"VAR [A-Z]+ = (\d+)", line))]
            statements = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])]
            at = [context.index(s) for s in statements]  # each on its own line, in order, noise between
            assert at == sorted(at) and all(b - a > 1 for a, b in zip(at, at[1:]))
            assert set(context) - set(statements) == {NOISE} and re.fullmatch(r"\d{5}", value)
        assert question.endswith(f", 5 variables are assigned the value {value}, they are: ")


def test_cwe_counts_its_ten_words_after_a_numbered_example_and_fwe_its_three(probes):
    for p in (p for p in probes if p.task == "cwe"):
        example, asked = p.prompt.split("\nBelow is a numbered list of words.", 1)
        shot = re.search(r"are: ((?:\d+\. \S+ ?){10})$", example)[1].split()
        common, rare = (6, 1) if p.length < 4096 else (30, 3)
        listed = re.findall(r"(\d+)\. (\S+)", asked.split("\nQuestion:")[0])
        assert [int(i) for i, _ in listed] == list(range(1, len(listed) + 1))
        counts = Counter(w for _, w in listed)
        assert {w for w, n in counts.items() if n == common} == set(p.outputs) and set(counts.values()) == {common, rare}
        assert shot[0::2] == [f"{i}." for i in range(1, 11)]  # the example's answer, numbered
        example_counts = Counter(re.findall(r"\d+\. (\S+)", example.split("\nQuestion:")[0]))
        assert {w for w, n in example_counts.items() if n == (3 if p.length < 4096 else 10)} == set(shot[1::2])
    for p in (p for p in probes if p.task == "fwe"):
        words = p.prompt.split("Find the three most frequently appeared coded words. ")[1].split("\nQuestion:")[0].split()
        assert [w for w, _ in Counter(words).most_common(4)] == ["...", *p.outputs]


def test_probes_are_deterministic_for_a_seed(tokenizer, essays, probes):
    again = ProbeFactory(ProbeSpec(lengths=(1024, 4096), samples=2), tokenizer, essays)
    assert [again.make(p.task, p.length, p.index).prompt_ids for p in probes[::-1]] == [p.prompt_ids for p in probes[::-1]]
    other = ProbeFactory(ProbeSpec(lengths=(1024,), seed=1), tokenizer, essays).make("niah_single_1", 1024, 0)
    assert other.outputs != probes[0].outputs


def test_fit_finds_the_largest_size_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        costs = np.cumsum(rng.integers(1, 40, size=3000)) + rng.integers(0, 500)  # monotone, uneven units
        budget, low = int(rng.integers(costs[0], costs[-1])), int(rng.integers(0, 3))
        calls = []

        def size(n):
            calls.append(n)
            return int(costs[n])

        best = int(np.searchsorted(costs, budget, side="right")) - 1
        guess = None if rng.random() < 0.5 else best + int(rng.integers(-20, 20))
        assert fit(size, budget, low, len(costs) - 1, guess) == (best if best >= low else None)
        assert len(calls) <= 20
    assert fit(lambda n: n, 10, 0, 5) == 5


def test_a_length_too_short_and_a_missing_qa_file_are_refused(tokenizer):
    with pytest.raises(ValueError, match="100 tokens hold no niah_single_1 probe"):
        ProbeFactory(ProbeSpec(tasks=("niah_single_1",)), tokenizer).make("niah_single_1", 100, 0)
    with pytest.raises(ValueError, match="qa_2 reads hotpotqa from a local file: pass --hotpotqa FILE"):
        ProbeFactory(ProbeSpec(tasks=("qa_2",)), tokenizer)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    """SQuAD 2.0 and HotpotQA in their own formats, a few questions each."""
    root = tmp_path_factory.mktemp("qa")
    paragraph = "The {x} river flows north through the valley of {x}, past the old mill and the bridge."
    squad = {"data": [{"title": f"t{a}", "paragraphs": [
        {"context": paragraph.format(x=f"A{a}P{p}"),
         "qas": [{"question": f"Which valley does the A{a}P{p} river cross?", "is_impossible": False,
                  "answers": [{"text": f"valley of A{a}P{p}"}, {"text": f"A{a}P{p}"}]},
                 {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
        for p in range(3)]} for a in range(4)]}
    hotpot = [{"question": f"Who built bridge {q}?", "answer": f"Builder{q}",
               "context": [[f"Bridge {q}-{i}", [f"Bridge {q}-{i} was built by Builder{q}. ", "It is old."]] for i in range(3)]}
              for q in range(3)]
    (root / "squad.json").write_text(json.dumps(squad))
    (root / "hotpot.json").write_text(json.dumps(hotpot))
    return str(root / "squad.json"), str(root / "hotpot.json")


def test_qa_asks_question_i_among_its_documents_as_ruler(tokenizer, qa_files):
    squad, hotpot = qa_files
    probes = ProbeFactory(ProbeSpec(tasks=("qa_1", "qa_2"), lengths=(600,), samples=3, squad=squad, hotpotqa=hotpot),
                          tokenizer).all()
    for p in probes:
        assert p.max_new_tokens == QA_TEMPLATE.tokens_to_generate and p.prompt.startswith(QA_TEMPLATE.text[:60])
        documents = re.findall(r"Document (\d+):\n", p.prompt)
        assert documents == [str(i) for i in range(1, len(documents) + 1)] and len(documents) >= 3
        question = re.search(r"\n\nQuestion: (.+) Answer:$", p.prompt)[1]
        if p.task == "qa_1":  # the i-th answerable question, its paragraph inside, any of its answers gold
            assert question == f"Which valley does the A0P{p.index} river cross?"
            assert p.outputs == [f"valley of A0P{p.index}", f"A0P{p.index}"] and 0 <= p.depth < 1
            assert p.prompt.count(f"valley of A0P{p.index},") >= 1
        else:
            assert question == f"Who built bridge {p.index}?" and p.outputs == [f"Builder{p.index}"] and p.depth is None
    with pytest.raises(ValueError, match="is not SQuAD JSON"):
        ProbeFactory(ProbeSpec(tasks=("qa_1",), squad=hotpot), tokenizer)


def test_rulers_metrics_and_post_processing():
    assert postprocess("  \x00The answer:\tParis\x1f ") == "The answer:\nParis"
    assert string_match_all("The numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("PARIS", ["paris"]) == 1.0
    # RULER's part (scripts/eval/synthetic/constants.py) is any gold string: lm-eval's port counts a share.
    assert string_match_part("It is in Paris.", ["Paris", "Paris, France"]) == 1.0
    assert string_match_part("Lyon", ["Paris", "Paris, France"]) == 0.0


def test_generate_scoring_asks_once_per_budget_and_reads_up_to_the_stop(tokenizer, probes):
    """RULER's verdicts on given continuations: each task's budget asked for, the continuation read up
    to its end of sequence."""
    chosen = [p for p in probes if p.length == 1024 and p.index == 0]
    asked: list[tuple[int, int]] = []

    def generate(prompts, max_new_tokens, stop_ids):
        asked.append((len(prompts), max_new_tokens))
        assert list(stop_ids) == [tokenizer.eos_id]
        by_prompt = {tuple(p.prompt_ids): p for p in chosen}
        out = []
        for ids in prompts:
            p = by_prompt[tuple(ids)]
            right = " ".join(p.outputs) if p.task != "niah_multivalue" else " ".join(p.outputs[:2])
            out.append(tokenizer.encode(f" {right}.") + [tokenizer.eos_id] + tokenizer.encode(" ".join(p.outputs)))
        return out

    verdicts = generate_verdicts(chosen, generate, tokenizer, [tokenizer.eos_id])
    assert sorted(asked) == sorted((sum(p.max_new_tokens == n for p in chosen), n) for n in {128, 30, 120, 50})
    assert {v.task: v.score for v in verdicts} == {t: 0.5 if t == "niah_multivalue" else 1.0 for t in SYNTHETIC}


@pytest.mark.slow
def test_niah_single_1_and_vt_are_lm_evals_ruler_text(smollm2, monkeypatch):
    """lm-eval's RULER (its own port of RULER's scripts): the same templates, and from its generator,
    for the same tokenizer and length, the same text once its keys, values and positions are written
    with ours (slow: importing lm-eval's niah builds 6M keys). niah_single_1 to
    the character; vt up to whitespace and one word, where the port departs from RULER (noise blocks
    end in a newline and are joined by spaces, so assignments share lines with noise; blank lines after
    the example; no space after the answer prefix; 'assgined' in it)."""
    import random

    import nltk
    from transformers import AutoTokenizer
    from nextlong_contract.tokenizer import load_tokenizer

    monkeypatch.setattr(nltk, "download", lambda *a, **k: True)  # lm-eval fetches punkt at import; noise needs none
    from lm_eval.tasks.ruler import cwe_utils, fwe_utils, niah_utils, prepare_niah, qa_utils, vt_utils

    # The templates, answer prefixes and budgets (lm-eval's vt prefix has a typo RULER fixed).
    assert niah_utils.TEMPLATE == NIAH_TEMPLATE.text
    for theirs, ours in ((cwe_utils.CONFIG, CWE_TEMPLATE), (fwe_utils.CONFIG, FWE_TEMPLATE), (qa_utils.CONFIG, QA_TEMPLATE)):
        assert (theirs["template"], theirs["answer_prefix"].strip(), theirs["tokens_to_generate"]) == (
            ours.text, ours.answer_prefix.strip(), ours.tokens_to_generate)
    vt = vt_utils.CONFIG["variable_tracking"]
    assert (vt["template"], vt["answer_prefix"].replace("assgined", "assigned"), vt["tokens_to_generate"]) == (
        VT_TEMPLATE.text, VT_TEMPLATE.answer_prefix, VT_TEMPLATE.tokens_to_generate)

    hf, ours = AutoTokenizer.from_pretrained(smollm2), load_tokenizer(str(smollm2))
    length = 2048
    factory = ProbeFactory(ProbeSpec(tasks=("niah_single_1", "vt"), lengths=(length,)), ours)
    random.seed(0)
    np.random.seed(0)

    doc = prepare_niah.generate_samples(prepare_niah.get_haystack("repeat"), max_seq_length=length,
                                        template=niah_utils.TEMPLATE, type_haystack="repeat", type_needle_k="words",
                                        type_needle_v="numbers", num_samples=1, TOKENIZER=hf)[0]
    theirs = doc["input"] + " " + doc["gen_prefix"]  # niah_single_1.yaml: target_delimiter " "
    context = theirs.split("\n")[1:-1]
    [at] = [i for i, line in enumerate(context) if line.startswith("One of")]
    [(key, _)] = _needles(context[at], "numbers")
    assert niah_prompt(NIAH["niah_single_1"], lines([NOISE] * (len(context) - 1), [(at, context[at])]), key) == theirs
    probe = factory.make("niah_single_1", length, 0)
    ours_context = probe.prompt.split("\n")[1:-1]
    # Both leave RULER's 128 tokens to generate; lm-eval grows its noise 5 blocks at a time below 4K.
    assert abs(len(ours_context) - len(context)) <= 5 and len(probe.prompt_ids) + 128 <= length

    random.seed(0)
    np.random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # lm-eval's vt prints its search
        example = vt_utils.sys_vartrack_w_noise_random(hf, num_samples=1, max_seq_length=500, incremental=5)[0]
        doc = vt_utils.sys_vartrack_w_noise_random(hf, num_samples=1, max_seq_length=length, icl_example=example)[0]
    theirs = doc["input"] + " " + doc["gen_prefix"]
    cut = theirs.index("Memorize and track", 1)
    parts = [_vt_parts(theirs[:cut]), _vt_parts(theirs[cut:])]
    example_names = theirs[:cut].split("they are:")[1].split()
    ours_text = vt_with_example(vt_prompt(*parts[0]), example_names, vt_prompt(*parts[1]))
    assert " ".join(ours_text.split()) == " ".join(theirs.replace("assgined", "assigned").split())
    assert [len(n) for n in example_names] == [3] * 5 and [len(n) for n in doc["outputs"]] == [5] * 5
    probe = factory.make("vt", length, 0)
    assert _vt_parts(probe.prompt.split("\n\nMemorize")[1])[0] >= parts[1][0]  # ours fits at least their noise


def _vt_parts(text: str) -> tuple[int, list[str], list[int], str]:
    """noise blocks, chain, each assignment's block index and the value of one vt prompt, read back."""
    items = re.findall(r"VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)|" + re.escape(NOISE), text)
    chain = [i for i in items if i.startswith("VAR")]
    value = chain[0].split(" = ")[1]
    names = [c.split()[1] for c in chain]
    slots = [items.index(c) - j for j, c in enumerate(chain)]
    return len(items) - len(chain), vt_chain(names, value), slots, value


def test_results_record_each_scoring_and_weigh_every_task_alike(tmp_path):
    from nextlong_eval.report import write_results
    from nextlong_eval.scoring import Generated, Verdict

    generated = ([Generated("niah_single_1", 1024, i, i / 4, "", 1.0) for i in range(4)]
                 + [Generated("niah_single_1", 2048, 0, 0.5, "", 0.0), Generated("cwe", 1024, 0, None, "", 0.0)])
    forced = [Verdict("vt", 1024, 0, 0.3, True, 1.0, -0.1, [0]), Verdict("vt", 1024, 1, 0.6, False, 0.5, -3.0, [0, 2])]
    written = write_results(tmp_path, {"generate": generated, "forced": forced}, {"model": "m"})
    results = json.loads((tmp_path / "results.json").read_text())
    g = results["generate"]
    assert g["tasks"] == {"niah_single_1": {"1024": 100.0, "2048": 0.0, "mean": 80.0}, "cwe": {"1024": 0.0, "mean": 0.0}}
    assert g["lengths"] == {"1024": 50.0, "2048": 0.0}
    assert g["mean"] == 40.0  # (80 + 0) / 2: five niah probes weigh what one cwe probe does
    assert len(g["probes"]) == 6 and results["forced"]["mean"] == 50.0 and results["model"] == "m"
    assert "| **mean of tasks** | 50.0 | 0.0 | **40.0** |" in (tmp_path / "table.md").read_text()
    assert [p.name for p in written] == ["results.json", "table.md", "heatmap-generate.png", "heatmap-forced.png"]
