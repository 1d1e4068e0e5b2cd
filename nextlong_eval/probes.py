"""RULER's 13 long-context tasks (NVIDIA/RULER scripts/data/synthetic, scripts/synthetic.yaml) built
offline in one tokenizer's tokens, under RULER's names and in its words: templates and answer
prefixes, noise blocks one per line with each needle on its own line, essay haystacks with needles
between sentences at RULER's depths, haystacks made of needles (niah_multikey_2/3), variable
tracking after one in-context example, common words after one worked example, coded-word
frequencies, and document QA.

A sample is drawn first, from the seed, the task, the length and its number (keys, values, where
each needle goes, word lists), then written out as RULER's text with n haystack units (noise blocks,
essay words, needles, listed words, coded words, documents): n is the largest whose prompt, tokenized
whole, leaves the task's `tokens_to_generate` (RULER's generation budget) within the length. The
prompt is RULER's input followed by its answer prefix, after a BOS when the tokenizer has one (the
training data starts with it).

Where this departs from RULER, and why:
- essay haystacks are the words of `essays` (a corpus of your choosing; RULER's are Paul Graham's
  essays, a download), cut into sentences after ., ! or ? (RULER: nltk's punkt, another download);
- cwe draws from wonderwords' words, as RULER does, until they run out (about 128K tokens): RULER then
  reads a downloaded word list; here longer cwe probes are refused;
- qa_1 and qa_2 read SQuAD 2.0 and HotpotQA files you name; as in RULER, sample i asks question i.

Each probe also carries a continuation to teacher-force (`answer_ids`): the gold strings as the
answer prefix leads into them, with each gold string's token span (the `forced` scoring).
"""

from __future__ import annotations

import json
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np

from nextlong_contract.tokenizer import TextTokenizer

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
SYNTHETIC = TASKS[:-2]  # the tasks that need no data set
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}


@dataclass(frozen=True)
class Template:
    """A task family's prompt (scripts/data/synthetic/constants.py): the input, then the answer prefix."""

    text: str
    answer_prefix: str
    tokens_to_generate: int

    def fill(self, **fields) -> str:
        return (self.text + self.answer_prefix).format(**fields)


NIAH_TEMPLATE = Template(
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
    "for {query} mentioned in the provided text?",
    " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128)
VT_TEMPLATE = Template(
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above.",
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: ", 30)
CWE_TEMPLATE = Template(
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
    " Answer: The top 10 words that appear most often in the list are:", 120)
FWE_TEMPLATE = Template(
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?",
    " Answer: According to the coded text above, the three most frequently appeared words are:", 50)
QA_TEMPLATE = Template(
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
    " Answer:", 32)


@dataclass(frozen=True)
class Niah:
    """A needle-in-a-haystack task's arguments (scripts/synthetic.yaml)."""

    haystack: str  # noise, essay or needle
    key: str  # words, numbers or uuids
    value: str
    keys: int = 1
    values: int = 1  # per key
    queries: int = 1  # keys asked for


NIAH = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", queries=4),
}
ESSAY_TASKS = tuple(task for task, args in NIAH.items() if args.haystack == "essay")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(np.round(np.linspace(0, 100, num=40)).astype(int).tolist())  # essay needle depths (%)
VT_HOPS, VT_EXAMPLE_TOKENS = 4, 500  # a chain of five variables; the example fitted to 500 tokens
CWE_COMMON = 10
ZETA_2 = np.pi ** 2 / 6  # fwe's counts follow a zeta distribution with alpha 2
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class Probe:
    task: str
    length: int  # asked for: len(prompt_ids) + max_new_tokens <= length
    index: int  # the sample's number among the task's at this length
    depth: float | None  # where the first gold needle, chain link or document sits, 0..1 (None: nowhere)
    prompt: str  # RULER's input and answer prefix
    prompt_ids: list[int]  # BOS (when the tokenizer has one) and the prompt, tokenized whole
    outputs: list[str]  # RULER's gold strings
    max_new_tokens: int  # RULER's tokens_to_generate for the task
    answer_ids: list[int]  # the continuation to teacher-force: the gold strings after the answer prefix
    gold_spans: list[tuple[int, int]]  # [start, end) of each teacher-forced gold string in answer_ids


@dataclass(frozen=True)
class ProbeSpec:
    tasks: tuple[str, ...] = SYNTHETIC
    lengths: tuple[int, ...] = (4096,)
    samples: int = 10  # per task and length (RULER: 500)
    seed: int = 0
    squad: str | None = None  # SQuAD 2.0 dev JSON, for qa_1
    hotpotqa: str | None = None  # HotpotQA dev (distractor) JSON, for qa_2


def corpus_texts(path: str, limit: int = 2000) -> list[str]:
    """Texts for essay haystacks: the first `limit` documents of a corpus (`synth` paths: files,
    directories, globs, or the bundled `sample:pydocs`)."""
    from synth.corpus import CorpusSpec, ReadStats, read_documents

    return [d.text for d in read_documents(CorpusSpec(path=path, max_docs=limit), ReadStats())]


# --- RULER's texts, from decisions already made ----------------------------------------------------
def niah_prompt(task: Niah, context: str, query: str) -> str:
    """The niah template around `context`; in the singular when one value is asked for (RULER
    rewrites its template's words, the needles keep the plural)."""
    template, kind = NIAH_TEMPLATE.text + NIAH_TEMPLATE.answer_prefix, task.value
    if task.queries * task.values == 1:
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(plural, singular)
        kind = kind[:-1]
    return template.format(type_needle_v=kind, context=context, query=query)


def query_of(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def lines(units: list[str], inserts: list[tuple[int, str]]) -> str:
    """`units` one per line, each (i, line) of `inserts` on its own line just before units[i] (RULER's
    list.insert at drawn indices); inserts at one index keep their order."""
    at = sorted(inserts, key=lambda insert: insert[0])
    out, k = [], 0
    for i, unit in enumerate(units):
        while k < len(at) and at[k][0] <= i:
            out.append(at[k][1])
            k += 1
        out.append(unit)
    return "\n".join(out + [line for _, line in at[k:]])


def essay(sentences: list[str], inserts: list[tuple[int, str]]) -> str:
    """Sentences with each (i, needle) of `inserts` (ordered by i) before sentence i, every stretch and
    needle joined by a space: an empty stretch leaves two spaces, as RULER's does."""
    cuts = [0] + [i for i, _ in inserts] + [len(sentences)]
    parts = []
    for k, (start, end) in enumerate(zip(cuts, cuts[1:])):
        parts.append(" ".join(sentences[start:end]))
        if k < len(inserts):
            parts.append(inserts[k][1])
    return " ".join(parts)


def vt_chain(names: list[str], value: str) -> list[str]:
    """RULER's assignments, each but the first with the trailing space RULER writes."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def vt_prompt(noises: int, chain: list[str], slots: list[int], value: str) -> str:
    """`noises` noise blocks with chain[j] before block slots[j] (slots ascending)."""
    context = lines([NOISE] * noises, list(zip(slots, chain)))
    return VT_TEMPLATE.fill(context=context, query=value, num_v=len(chain))


def vt_with_example(example: str, example_names: list[str], prompt: str) -> str:
    """RULER's in-context example before the question: its prompt and answer, then a blank line."""
    return f"{example} {' '.join(example_names)}\n\n{prompt}"


def numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, start=1))


def cwe_prompt(example: list[str], example_common: list[str], listed: list[str]) -> str:
    """RULER's worked example (a list and its numbered answer), then the list asked about."""
    shot = CWE_TEMPLATE.fill(context=numbered(example)) + " " + numbered(example_common)
    return shot + "\n" + CWE_TEMPLATE.fill(context=numbered(listed))


def qa_prompt(documents: list[str], question: str) -> str:
    context = "\n\n".join(f"Document {i}:\n{doc}" for i, doc in enumerate(documents, start=1))
    return QA_TEMPLATE.fill(context=context, query=question)


# --- QA data sets, read as RULER reads them -----------------------------------------------------------
@dataclass(frozen=True)
class QaSet:
    questions: list[dict]  # query, outputs, context (its documents), more (its article's other documents)
    documents: list[str]


def _json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise ValueError(f"{path} is not JSON: pass {what}") from None


def read_squad(path: str) -> QaSet:
    """SQuAD (RULER: dev-v2.0.json): each answerable question, its paragraph and its article's others."""
    data = _json(path, "SQuAD 2.0's dev-v2.0.json")
    try:
        documents = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        at = {doc: i for i, doc in enumerate(documents)}
        questions = []
        for d in data["data"]:
            article = [at[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = at[p["context"]]
                questions += [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]], "context": [own],
                               "more": [i for i in article if i != own]}
                              for q in p["qas"] if not q.get("is_impossible", False)]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not SQuAD JSON (data/paragraphs/qas): pass SQuAD 2.0's dev-v2.0.json") from None
    return QaSet(questions, documents)


def read_hotpotqa(path: str) -> QaSet:
    """HotpotQA (RULER: hotpot_dev_distractor_v1.json): each question with its ten paragraphs."""
    data = _json(path, "HotpotQA's hotpot_dev_distractor_v1.json")
    try:
        documents = sorted({f"{title}\n{''.join(sentences)}" for d in data for title, sentences in d["context"]})
        at = {doc: i for i, doc in enumerate(documents)}
        questions = [{"query": d["question"], "outputs": [d["answer"]], "more": [],
                      "context": [at[f"{title}\n{''.join(sentences)}"] for title, sentences in d["context"]]}
                     for d in data]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is not HotpotQA JSON (question/answer/context): pass "
                         "hotpot_dev_distractor_v1.json") from None
    return QaSet(questions, documents)


# --- drawing ----------------------------------------------------------------------------------------
@cache
def _wonderwords(name: str) -> tuple[str, ...]:
    return tuple(word.rstrip() for word in files("wonderwords.assets").joinpath(name).read_text().splitlines())


@cache
def cwe_words() -> tuple[str, ...]:
    """RULER's common-word pool: wonderwords' nouns, adjectives and verbs."""
    return tuple(sorted({w for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt") for w in _wonderwords(name)}))


def _random(kind: str, rng: np.random.Generator) -> str:
    """RULER's generate_random: a 7-digit number, an adjective-noun pair, or a UUID."""
    if kind == "numbers":
        return str(rng.integers(10 ** 6, 10 ** 7))
    if kind == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    adjectives, nouns = _wonderwords("adjectivelist.txt"), _wonderwords("nounlist.txt")
    return f"{adjectives[rng.integers(len(adjectives))]}-{nouns[rng.integers(len(nouns))]}"


def _names(rng: np.random.Generator, count: int, letters: int, alphabet: str = string.ascii_uppercase) -> list[str]:
    """`count` distinct random strings of `letters` letters."""
    names: dict[str, None] = {}
    while len(names) < count:
        names["".join(rng.choice(list(alphabet), letters))] = None
    return list(names)


def _slots(seed: int, n: int, count: int) -> list[int]:
    """`count` distinct lines of an n-line haystack (RULER's random.sample(range(n), count)), the same
    for the same sample and n: a line haystack's token count does not depend on them."""
    return np.random.default_rng([seed, n]).choice(n, count, replace=False).tolist()


class _Stream:
    """Draws made as far as asked, so the n-unit haystack is a prefix of the (n + 1)-unit one."""

    def __init__(self, draw: Callable[[], str]):
        self.draw, self.items = draw, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.draw())
        return self.items[:n]


def fit(size: Callable[[int], int], budget: int, low: int, high: int, guess: int | None = None) -> int | None:
    """The largest n in [low, high] with size(n) <= budget (None: not even `low`), for sizes that grow
    with n about linearly (haystack units of like token counts). Each step measures where the line
    through the last two sizes meets the budget, inside the bracket (a fitting n, a failing one) known
    so far; from a good `guess`, two to four sizes close the bracket. A bracket of 32 or fewer, or
    steps past the eighth, bisect: a unit's tokens vary, so nearby sizes give no slope to trust."""
    sizes = {low: size(low)}
    if sizes[low] > budget:
        return None
    lo, hi = low, high + 1  # size(lo) fits; size(hi) does not (high + 1: past the range)
    previous, n, steps = low, low + 16 if guess is None else guess, 0
    while hi - lo > 1:
        n = min(hi - 1, max(lo + 1, n))
        sizes[n] = size(n)
        lo, hi = (n, hi) if sizes[n] <= budget else (lo, n)
        slope, steps = (sizes[n] - sizes[previous]) / (n - previous), steps + 1
        if hi <= high and (hi - lo <= 32 or steps > 8 or slope <= 0):
            previous, n = n, (lo + hi) // 2
        else:
            previous, n = n, n + int((budget - sizes[n]) / slope) if slope > 0 else 2 * n
    return lo


class ProbeFactory:
    """Makes the probes of one `ProbeSpec` for one tokenizer; deterministic for a seed. `essays`: texts
    for the essay haystacks (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery)."""

    def __init__(self, spec: ProbeSpec, tokenizer: TextTokenizer, essays: list[str] = ()):
        unknown = [t for t in spec.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        if not essays and any(t in ESSAY_TASKS for t in spec.tasks):
            raise ValueError(f"{', '.join(t for t in spec.tasks if t in ESSAY_TASKS)} need essay texts for their "
                             "haystack: pass a corpus (nextlong-eval probes --corpus)")
        paths = {"qa_1": spec.squad, "qa_2": spec.hotpotqa}
        for task in spec.tasks:
            if task in QA_DATASETS and not paths[task]:
                raise ValueError(f"{task} reads {QA_DATASETS[task]} from a local file: pass --{QA_DATASETS[task]} FILE "
                                 "(RULER's: dev-v2.0.json for squad, hotpot_dev_distractor_v1.json for hotpotqa)")
        self.spec, self.tokenizer = spec, tokenizer
        # Sample 0's haystack size for a task and length: where the other samples' searches start.
        self.fitted: dict[tuple[str, int], int] = {}
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.words = " ".join(essays).split()
        self.sentence_ends = np.array([bool(_SENTENCE_END.search(w)) for w in self.words], bool)
        self.qa = {task: (read_squad if QA_DATASETS[task] == "squad" else read_hotpotqa)(paths[task])
                   for task in spec.tasks if task in QA_DATASETS}

    def all(self) -> list[Probe]:
        s = self.spec
        return [self.make(task, length, i) for length in s.lengths for task in s.tasks for i in range(s.samples)]

    def make(self, task: str, length: int, index: int) -> Probe:
        if index and (task, length) not in self.fitted:
            # Sample 0 first, whatever the order asked for: with sizes not quite monotone (a unit's
            # tokens vary), where a search starts could change where it ends.
            self.make(task, length, 0)
        rng = np.random.default_rng([self.spec.seed, TASKS.index(task), length, index])
        if task in NIAH:
            return self._niah(task, length, index, rng)
        return {"vt": self._vt, "cwe": self._cwe, "fwe": self._fwe}.get(task, self._qa)(task, length, index, rng)

    # --- assembly ------------------------------------------------------------------------------------
    def _fitted(self, task: str, length: int, template: Template, build: Callable[[int], tuple[str, float | None]],
                low: int, high: int) -> tuple[int, str, float | None, list[int]]:
        """n, prompt, depth and prompt ids of the largest haystack that leaves the task's generation
        budget within `length`."""
        built: dict[int, tuple[str, float | None, list[int]]] = {}

        def size(n: int) -> int:
            prompt, depth = build(n)
            built[n] = prompt, depth, self.bos + self.tokenizer.encode(prompt)
            return len(built[n][2])

        n = fit(size, length - template.tokens_to_generate, low, high, self.fitted.get((task, length)))
        if n is None:
            raise ValueError(f"{task}: {length} tokens hold no {task} probe (its smallest prompt is {len(built[low][2])} "
                             f"tokens, and {template.tokens_to_generate} are kept to generate); ask for a longer "
                             f"length or leave {task} out")
        self.fitted.setdefault((task, length), n)
        return (n, *built[n])

    def _probe(self, task: str, length: int, index: int, template: Template, fitted: tuple, outputs: list[str],
               answer: list[tuple[str, bool]]) -> Probe:
        """`answer`: the teacher-forced continuation's parts, (text, is a gold string), tokenized one by one
        so that each gold string's span is exact."""
        _, prompt, depth, prompt_ids = fitted
        answer_ids, spans = [], []
        for text, gold in answer:
            ids = self.tokenizer.encode(text)
            if gold:
                spans.append((len(answer_ids), len(answer_ids) + len(ids)))
            answer_ids += ids
        return Probe(task, length, index, depth, prompt, prompt_ids, outputs, template.tokens_to_generate,
                     answer_ids, spans)

    def _sentences(self, n: int) -> list[str]:
        """The first n essay words (the essays repeated as needed) as sentences."""
        words = self.words if n <= len(self.words) else self.words * (n // len(self.words) + 1)
        ends = (np.flatnonzero(np.resize(self.sentence_ends, n)) + 1).tolist()
        cuts = [0] + ends + ([n] if not ends or ends[-1] != n else [])
        return [" ".join(words[a:b]) for a, b in zip(cuts, cuts[1:])]

    # --- tasks ---------------------------------------------------------------------------------------
    def _niah(self, task: str, length: int, index: int, rng: np.random.Generator) -> Probe:
        args = NIAH[task]
        keys = [_random(args.key, rng) for _ in range(max(args.keys, args.queries))]
        values = [[_random(args.value, rng) for _ in range(args.values)] for _ in keys]
        needles = [(k, NEEDLE.format(type_needle_v=args.value, key=key, value=v))
                   for k, (key, vs) in enumerate(zip(keys, values)) for v in vs]
        needles = [needles[i] for i in rng.permutation(len(needles))]  # RULER shuffles them
        asked = rng.choice(len(keys), size=args.queries, replace=False).tolist()
        query, outputs = query_of([keys[k] for k in asked]), [v for k in asked for v in values[k]]

        if args.haystack == "essay":  # RULER's depths, without replacement, in order
            depths = sorted(rng.choice(DEPTHS, size=len(needles), replace=False).tolist())

            def build(n: int) -> tuple[str, float | None]:
                sentences = self._sentences(n)
                inserts = [(int(len(sentences) * d / 100), text) for d, (_, text) in zip(depths, needles)]
                first = min(d for d, (k, _) in zip(depths, needles) if k in asked)
                return niah_prompt(args, essay(sentences, inserts), query), first / 100
        else:  # each needle before its own drawn haystack line
            seed = int(rng.integers(2 ** 63))
            if args.haystack == "noise":
                units = _Stream(lambda: NOISE)
            else:
                stream = np.random.default_rng(rng.integers(2 ** 63))
                units = _Stream(lambda: NEEDLE.format(type_needle_v=args.value, key=_random(args.key, stream),
                                                      value=_random(args.value, stream)))

            def build(n: int) -> tuple[str, float | None]:
                slots = _slots(seed, n, len(needles))
                first = min(slot for slot, (k, _) in zip(slots, needles) if k in asked)
                return niah_prompt(args, lines(units.take(n), [(s, t) for s, (_, t) in zip(slots, needles)]), query), first / n
        fitted = self._fitted(task, length, NIAH_TEMPLATE, build, len(needles), length)
        answer = [part for i, value in enumerate(outputs) for part in ([(",", False)] if i else []) + [(f" {value}", True)]]
        return self._probe(task, length, index, NIAH_TEMPLATE, fitted, outputs, answer)

    def _vt(self, task: str, length: int, index: int, rng: np.random.Generator) -> Probe:
        """After RULER's example (three-letter names, fitted alone to 500 tokens), a chain of five-letter
        names from a 5-digit value, the assignments in order, each before its own drawn noise block."""
        links = VT_HOPS + 1
        example_names, example_value = _names(rng, links, 3), str(rng.integers(10000, 99999))
        example_seed, seed = int(rng.integers(2 ** 63)), int(rng.integers(2 ** 63))

        def example_prompt(n: int) -> str:
            return vt_prompt(n, vt_chain(example_names, example_value), sorted(_slots(example_seed, n, links)), example_value)

        noises = fit(lambda n: len(self.tokenizer.encode(example_prompt(n))), VT_EXAMPLE_TOKENS, links, VT_EXAMPLE_TOKENS)
        example = example_prompt(noises)
        names, value = _names(rng, links, 5), str(rng.integers(10000, 99999))

        def build(n: int) -> tuple[str, float | None]:
            slots = sorted(_slots(seed, n, links))
            return vt_with_example(example, example_names, vt_prompt(n, vt_chain(names, value), slots, value)), slots[0] / n

        fitted = self._fitted(task, length, VT_TEMPLATE, build, links, length)
        return self._probe(task, length, index, VT_TEMPLATE, fitted, names, [(f" {name}", True) for name in names])

    def _cwe(self, task: str, length: int, index: int, rng: np.random.Generator) -> Probe:
        """Ten words repeated more often than the rest, after a worked example; RULER's repetitions:
        3 / 1 in the example and 6 / 1 in the list below 4K tokens, 10 / 3 and 30 / 3 from 4K."""
        pool = cwe_words()
        (example_size, *example_repeats), repeats = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
        example_words = [pool[i] for i in rng.choice(len(pool), example_size, replace=False)]
        example = self._repeated(example_words, example_repeats, rng)
        order, seed = rng.permutation(len(pool)), int(rng.integers(2 ** 63))

        def build(n: int) -> tuple[str, float | None]:
            words = [pool[i] for i in order[:n]]
            return cwe_prompt(example, example_words[:CWE_COMMON], self._repeated(words, repeats, np.random.default_rng([seed, n]))), None

        fitted = self._fitted(task, length, CWE_TEMPLATE, build, CWE_COMMON, len(pool))
        if fitted[0] == len(pool):
            raise ValueError(f"cwe at {length} tokens needs more than wonderwords' {len(pool)} words (RULER then reads "
                             "a downloaded word list); ask for a shorter length or leave cwe out")
        common = [pool[i] for i in order[:CWE_COMMON]]
        answer = [part for i, word in enumerate(common, start=1) for part in ((f" {i}.", False), (f" {word}", True))]
        return self._probe(task, length, index, CWE_TEMPLATE, fitted, common, answer)

    @staticmethod
    def _repeated(words: list[str], repeats: tuple[int, int], rng: np.random.Generator) -> list[str]:
        """The first ten words `repeats[0]` times each, the rest `repeats[1]` times, shuffled."""
        listed = words[:CWE_COMMON] * repeats[0] + words[CWE_COMMON:] * repeats[1]
        return [listed[i] for i in rng.permutation(len(listed))]

    def _fwe(self, task: str, length: int, index: int, rng: np.random.Generator) -> Probe:
        """Coded words (six random letters, one vocabulary word per 50 tokens of the length) counted by
        rank k as N k^-2 / zeta(2); the top one is '...', noise; the answer is ranks 2 to 4."""
        budget = length - FWE_TEMPLATE.tokens_to_generate
        vocabulary = np.array(["..."] + _names(rng, max(budget // 50, 4) - 1, 6, string.ascii_lowercase), dtype=object)
        share = np.arange(1, len(vocabulary) + 1) ** -2.0 / ZETA_2
        seed = int(rng.integers(2 ** 63))

        def build(n: int) -> tuple[str, float | None]:
            words = np.repeat(vocabulary, (n * share).astype(int))
            return FWE_TEMPLATE.fill(context=" ".join(words[np.random.default_rng([seed, n]).permutation(len(words))])), None

        # From 1 / share[3] words on, every answer word is in the text.
        fitted = self._fitted(task, length, FWE_TEMPLATE, build, int(np.ceil(1 / share[3])), 2 * budget)
        outputs = vocabulary[1:4].tolist()
        return self._probe(task, length, index, FWE_TEMPLATE, fitted, outputs, [(f" {w}", True) for w in outputs])

    def _qa(self, task: str, length: int, index: int, rng: np.random.Generator) -> Probe:
        """Question `index` among its own documents, its article's others, then any others (RULER's
        order of preference), shuffled; its depth is its own document's place when it has one."""
        data = self.qa[task]
        question = data.questions[index % len(data.questions)]
        own, more = question["context"], question["more"]
        others = np.ones(len(data.documents), bool)
        others[own + more] = False
        candidates = own + rng.permutation(more).tolist() + rng.permutation(np.flatnonzero(others)).tolist()
        seed = int(rng.integers(2 ** 63))

        def build(n: int) -> tuple[str, float | None]:
            chosen = [candidates[i % len(candidates)] for i in range(n)]  # RULER repeats them past the last
            order = np.random.default_rng([seed, n]).permutation(n)
            depth = float(np.flatnonzero(order == 0)[0]) / n if len(own) == 1 else None
            return qa_prompt([data.documents[chosen[i]] for i in order], question["query"]), depth

        fitted = self._fitted(task, length, QA_TEMPLATE, build, len(own), length)
        # Any gold answer counts (string_match_part): the shortest is the one teacher-forced.
        return self._probe(task, length, index, QA_TEMPLATE, fitted, question["outputs"],
                           [(" " + min(question["outputs"], key=len), True)])
