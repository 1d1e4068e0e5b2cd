"""Long-context probes after RULER's synthetic tasks (NVIDIA/RULER, scripts/data/synthetic): needle in a
haystack (one key; several keys with distractors; several values of one key; several keys asked at
once), variable tracking (a chain of five assignments) and common-word extraction, generated offline.

Every probe is built in the model's own tokens: each piece of text (instruction, haystack sentence,
needle, question, answer part) is tokenized on its own and the ids concatenated, so the decoded
prompt is exactly the pieces' text and `len(prompt) + len(answer)` is exactly the length asked for;
the haystack takes what is left and its last sentence is cut to fit. Needles go in at sentence
boundaries, the probe's one at the boundary nearest its depth (0 = start of the haystack, 1 = end).
The prompt ends with an answer prefix, so the answer follows it directly. Answers with several
parts list them in the order they appear (values, queried keys, the chain) and record each gold
string's token span, for RULER's `string_match_all`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, cycle

import numpy as np

from synth.tokenizer import TextTokenizer

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
HAYSTACKS = ("noise", "essay")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "cold", "crimson", "curious", "damp", "eager", "early",
              "fancy", "fierce", "gentle", "giant", "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly",
              "lazy", "little", "lively", "lucky", "misty", "modern", "narrow", "noisy", "odd", "pale", "proud",
              "quiet", "rapid", "rare", "rusty", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "sour",
              "spicy", "steep", "stormy", "swift", "tame", "tiny", "velvet", "wild", "windy", "wise", "young")
NOUNS = ("anchor", "apple", "badger", "banner", "barrel", "beacon", "bicycle", "blanket", "bridge", "candle",
         "canyon", "castle", "comet", "compass", "cottage", "crystal", "desert", "dolphin", "engine", "falcon",
         "feather", "forest", "fountain", "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket",
         "kettle", "ladder", "lantern", "meadow", "mirror", "mountain", "needle", "orchard", "otter", "painter",
         "pebble", "piano", "pillow", "planet", "pocket", "rabbit", "river", "saddle", "spider", "statue",
         "teapot", "thunder", "tiger", "trumpet", "tunnel", "valley", "violin", "wagon", "walnut", "window")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\b[a-z]{4,10}\b")


@dataclass(frozen=True)
class Probe:
    task: str
    length: int
    depth: float  # where the probe's needle (or the chain's first link) sits in the haystack, 0..1
    prompt_ids: list[int]
    answer_ids: list[int]
    gold_spans: list[tuple[int, int]]  # [start, end) of each gold string in answer_ids
    gold_texts: list[str]
    needle_offset: int = -1  # token offset of the probe's needle in the prompt (-1: none)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeSpec:
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (4096,)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    haystack: str = "noise"  # noise, or essay sentences from `essay_texts`
    uuid_values: bool = False  # values as UUIDs instead of 7-digit numbers
    seed: int = 0


def corpus_texts(path: str, limit: int = 2000) -> list[str]:
    """Texts for essay haystacks and common-word lists: the first `limit` documents of a corpus
    (`synth` paths: files, directories, globs, or the bundled `sample:pydocs`)."""
    from synth.corpus import CorpusSpec, ReadStats, read_documents

    return [d.text for d in read_documents(CorpusSpec(path=path, max_docs=limit), ReadStats())]


class _Pieces:
    """Text pieces tokenized one by one (see the module docstring)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def ids(self, *texts: str) -> list[int]:
        return [i for text in texts for i in self.tokenizer.encode(text)]


def _haystack_units(spec: ProbeSpec, essays: list[str], rng: np.random.Generator) -> Iterator[str]:
    if spec.haystack == "noise":
        return cycle(" " + s for s in NOISE)
    sentences = [s for text in essays for s in _SENTENCE.split(text.replace("\n", " ")) if s.strip()]
    start = int(rng.integers(len(sentences)))
    return cycle(" " + s.strip() for s in sentences[start:] + sentences[:start])


def _fill(pieces: _Pieces, units: Iterator[str], budget: int) -> list[list[int]]:
    """Haystack units as id lists totalling exactly `budget` tokens, the last one cut to fit."""
    out, total = [], 0
    while total < budget:
        ids = pieces.ids(next(units))[:budget - total]
        out.append(ids)
        total += len(ids)
    return out


def _assemble(task: str, length: int, depth: float, pieces: _Pieces, head: list[int], units: Iterator[str],
              needles: list[tuple[float, list[int]]], tail: list[int],
              answer: list[tuple[str, bool]], meta: dict) -> Probe:
    """`needles` (depth, ids), the probe's own first; `answer` (text, is a gold string) parts."""
    answer_ids, spans, golds = [], [], []
    for text, gold in answer:
        ids = pieces.ids(text)
        if gold:
            spans.append((len(answer_ids), len(answer_ids) + len(ids)))
            golds.append(text.strip())
        answer_ids += ids
    fixed = len(head) + len(tail) + len(answer_ids) + sum(len(ids) for _, ids in needles)
    budget = length - fixed
    if budget < 16:
        raise ValueError(f"{task}: {length} tokens leave no room for a haystack ({fixed} are instructions, "
                         "needles and answer); ask for a longer length")
    haystack = _fill(pieces, units, budget)
    starts = np.cumsum([0] + [len(u) for u in haystack])  # unit boundaries, in haystack tokens
    slots = [int(np.argmin(np.abs(starts - d * budget))) for d, _ in needles]
    prompt, offset = list(head), -1
    order = sorted(range(len(needles)), key=lambda n: (slots[n], needles[n][0], n))  # by depth, stably
    done = 0
    for n in order:
        for unit in haystack[done:slots[n]]:
            prompt += unit
        done = max(done, slots[n])
        if n == 0:
            offset = len(prompt)
        prompt += needles[n][1]
    for unit in haystack[done:]:
        prompt += unit
    prompt += tail
    assert len(prompt) + len(answer_ids) == length
    return Probe(task, length, depth, prompt, answer_ids, spans, golds, offset,
                 {**meta, "haystack_start": len(head), "haystack_tokens": budget})


class ProbeFactory:
    """Makes the probes of one `ProbeSpec` for one tokenizer; deterministic for a seed."""

    def __init__(self, spec: ProbeSpec, tokenizer: TextTokenizer, essays: list[str] = ()):
        if spec.haystack == "essay" and not essays:
            raise ValueError("an essay haystack needs texts (a corpus)")
        self.spec, self.pieces, self.essays = spec, _Pieces(tokenizer), list(essays)
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        words = sorted({w for text in self.essays for w in _WORD.findall(text)} - set(ADJECTIVES) - set(NOUNS))
        self.words = words if len(words) >= 200 else [a + n for a in ADJECTIVES for n in NOUNS]

    def all(self) -> list[Probe]:
        s = self.spec
        return [self.make(task, length, depth) for length in s.lengths for task in s.tasks
                for depth in (s.depths if task != "cwe" else (0.0,))]

    def make(self, task: str, length: int, depth: float) -> Probe:
        rng = np.random.default_rng([self.spec.seed, TASKS.index(task), length, int(round(depth * 1000))])
        units = _haystack_units(self.spec, self.essays, rng)
        return getattr(self, f"_{task}")(task, length, depth, rng, units)

    # --- values and keys -------------------------------------------------------------------------
    def _keys(self, rng: np.random.Generator, n: int) -> list[str]:
        pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
        return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs.tolist()]

    def _values(self, rng: np.random.Generator, n: int) -> list[str]:
        if self.spec.uuid_values:
            import uuid

            return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
        return [str(v) for v in rng.choice(np.arange(1_000_000, 10_000_000), size=n, replace=False)]

    def _needle(self, key: str, value: str) -> list[int]:
        return self.pieces.ids(f" One of the special magic numbers for {key} is: {value}.")

    # --- needle in a haystack ----------------------------------------------------------------------
    _HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.\n")

    def _niah(self, task, length, depth, rng, units, keys: list[str], values: list[str], asked: list[str],
              answers: list[str] | None = None) -> Probe:
        """Needles `keys[i]: values[i]`, the first at `depth`, the others at seeded random depths; the
        question asks for `asked`; the answer is `answers`, or (None) every value in prompt order."""
        depths = [depth] + rng.random(len(keys) - 1).tolist()
        needles = [(d, self._needle(k, v)) for d, k, v in zip(depths, keys, values)]
        if answers is None:  # sorted as `_assemble` places them: by depth, ties in needle order
            answers = [values[i] for i in sorted(range(len(values)), key=lambda i: (depths[i], i))]
        if len(answers) == 1:
            question = (f"\nWhat is the special magic number for {asked[0]} mentioned in the provided text? "
                        f"The special magic number for {asked[0]} mentioned in the provided text is")
        else:
            names = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f", and {asked[-1]}"
            question = (f"\nWhat are all the special magic numbers for {names} mentioned in the provided text? "
                        f"The special magic numbers for {names} mentioned in the provided text are")
        parts = [p for i, a in enumerate(answers) for p in ([(",", False)] if i else []) + [(f" {a}", True)]]
        return _assemble(task, length, depth, self.pieces, self.bos + self.pieces.ids(self._HEAD), units, needles,
                         self.pieces.ids(question), parts, {"keys": keys, "values": values})

    def _niah_single(self, task, length, depth, rng, units):
        key, value = self._keys(rng, 1), self._values(rng, 1)
        return self._niah(task, length, depth, rng, units, key, value, key, value)

    def _niah_multikey(self, task, length, depth, rng, units):
        """Three distractor needles with other keys."""
        keys, values = self._keys(rng, 4), self._values(rng, 4)
        return self._niah(task, length, depth, rng, units, keys, values, keys[:1], values[:1])

    def _niah_multivalue(self, task, length, depth, rng, units):
        key, values = self._keys(rng, 1), self._values(rng, 4)
        return self._niah(task, length, depth, rng, units, key * 4, values, key)

    def _niah_multiquery(self, task, length, depth, rng, units):
        keys, values = self._keys(rng, 4), self._values(rng, 4)
        return self._niah(task, length, depth, rng, units, keys, values, keys, values)

    # --- variable tracking -------------------------------------------------------------------------
    def _vt(self, task, length, depth, rng, units):
        names = ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5)) for _ in range(5)]
        value = self._values(rng, 1)[0]
        links = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        needles = [(depth + i * (1.0 - depth) / len(links), self.pieces.ids(link)) for i, link in enumerate(links)]
        head = self.bos + self.pieces.ids("Memorize and track the chain(s) of variable assignment hidden in the "
                                          "following text.\n\n")
        tail = self.pieces.ids(f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                               "above. Answer: According to the chain(s) of variable assignment in the text above, "
                               f"{len(names)} variables are assigned the value {value}, they are:")
        return _assemble(task, length, depth, self.pieces, head, units, needles, tail,
                         [(f" {n}", True) for n in names], {"variables": names, "value": value})

    # --- common words ------------------------------------------------------------------------------
    def _cwe(self, task, length, depth, rng, units):
        """Ten words repeated often among words repeated a few times, as a numbered list; frequencies
        scale down with the length so the ten stay the most common ones."""
        chosen = rng.permutation(len(self.words))
        common, rare = [self.words[i] for i in chosen[:10]], [self.words[i] for i in chosen[10:]]
        head = self.bos + self.pieces.ids("Below is a numbered list of words. In these words, some appear more "
                                          "often than others. Memorize the ones that appear most often.\n")
        tail = self.pieces.ids("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 "
                               "words that appear most often in the list are:")
        answer = self.pieces.ids(*(f" {w}" for w in common))
        # Items past 100 take more tokens than these; aiming at 85% of the room keeps the whole list in.
        room = 0.85 * (length - len(head) - len(tail) - len(answer))
        items_fit = room / np.mean([len(self.pieces.ids(f" 100. {w}")) for w in common])
        freq_common = int(np.clip(items_fit // 40, 4, 30))
        freq_rare = 2 if freq_common < 10 else 3
        n_rare = int(np.clip((items_fit - 10 * freq_common) // freq_rare, 0, len(rare)))
        listed = common * freq_common + rare[:n_rare] * freq_rare
        rng.shuffle(listed)
        # After the list, unused words (then the used ones again) fill what is left, one at a time.
        words = chain(listed, cycle(rare[n_rare:] + rare[:n_rare]))
        items = (f" {i}. {w}" for i, w in enumerate(words, start=1))
        order = sorted(common, key=listed.index)
        return _assemble(task, length, depth, self.pieces, head, items, [], tail,
                         [(f" {w}", True) for w in order], {"common": order, "frequency": freq_common})
