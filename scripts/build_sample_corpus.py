"""Build the small corpora bundled in synth/sample_data from freely licensed text.

Inputs are the reST sources of the Python 3.11 documentation (Debian package python3.11-doc) and
the Jargon File in dictd format (Debian package dict-jargon):

  python scripts/build_sample_corpus.py \
      --pydoc-sources /path/to/usr/share/doc/python3.11/html/_sources \
      --jargon-dir /path/to/usr/share/dictd \
      --out synth/sample_data

The output is byte-for-byte reproducible: files are visited in sorted order and the gzip headers
carry neither a timestamp nor a file name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PYTHON_RELEASE = "3.11.2"
PYDOC_PACKAGE = "python3.11-doc 3.11.2-6+deb12u9 (Debian 12)"
JARGON_PACKAGE = "dict-jargon 4.4.7-3.1 (Debian 12)"
PYDOC_SUFFIX = ".rst.txt"
MIN_SECTION_CHARS = 200
MIN_JARGON_CHARS = 80

# Any run of one reST punctuation character, at least three long, is a candidate adornment.
_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*")
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")
_ROLE_LABEL = re.compile(r"^(.*?)\s*<[^>]*>$")
_NON_SLUG = re.compile(r"[^a-z0-9]+")
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class Record:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Heading:
    start: int  # first line of the heading (the overline, if any)
    title: str


def _is_adornment(line: str) -> bool:
    return _ADORNMENT.fullmatch(line) is not None


def _is_title_text(line: str) -> bool:
    return bool(line.strip()) and not _is_adornment(line.strip())


def find_headings(lines: list[str]) -> list[Heading]:
    """Section titles: underlined, or over- and underlined with the same character.

    A title must follow a blank line (as reST requires), which keeps text lines that happen to
    precede a transition or a table border from being taken for titles.
    """
    headings = []
    i = 0
    while i + 1 < len(lines):
        after_blank = i == 0 or not lines[i - 1].strip()
        if (after_blank and i + 2 < len(lines) and _is_adornment(lines[i])
                and _is_title_text(lines[i + 1]) and _is_adornment(lines[i + 2])
                and lines[i][0] == lines[i + 2][0]
                and len(lines[i + 2].rstrip()) >= len(lines[i + 1].strip())):
            headings.append(Heading(i, lines[i + 1].strip()))
            i += 3
        elif (after_blank and _is_title_text(lines[i]) and not lines[i][0].isspace()
                and _is_adornment(lines[i + 1])
                and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())):
            headings.append(Heading(i, lines[i].strip()))
            i += 2
        else:
            i += 1
    return headings


def plain_title(title: str) -> str:
    """The title as a reader sees it: roles reduced to their text, inline markup dropped."""

    def role_text(match: re.Match[str]) -> str:
        text = match.group(1)
        labelled = _ROLE_LABEL.match(text)
        return (labelled.group(1) if labelled else text).lstrip("~!")

    return _ROLE.sub(role_text, title).replace("``", "").replace("**", "").strip()


def slug(title: str) -> str:
    return _NON_SLUG.sub("-", title.lower()).strip("-") or "section"


def unique_key(key: str, taken: set[str]) -> str:
    """`key`, or `key-2`, `key-3`, ... for repeats; records the result in `taken`."""
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}-{n}"
    taken.add(candidate)
    return candidate


def split_sections(doc_name: str, text: str) -> Iterator[Record]:
    """One record per section; text before the first title is a section of its own."""
    lines = text.splitlines()
    headings = find_headings(lines)
    bounds = [h.start for h in headings] + [len(lines)]
    # (title, slug, first line, end line); the preamble is named after the page.
    spans = [(doc_name, "preamble", 0, bounds[0])]
    spans += [(plain_title(h.title), None, h.start, end) for h, end in zip(headings, bounds[1:])]
    taken: set[str] = set()
    for title, key, begin, end in spans:
        body = "\n".join(lines[begin:end]).rstrip()
        if len(body) >= MIN_SECTION_CHARS:
            section = unique_key(key or slug(title), taken)
            yield Record(f"{doc_name}#{section}", title, body)


def pydoc_records(sources: Path) -> Iterator[Record]:
    pages = sorted(p.relative_to(sources).as_posix() for p in sources.rglob(f"*{PYDOC_SUFFIX}"))
    for page in pages:
        text = (sources / page).read_text(encoding="utf-8")
        yield from split_sections(page[: -len(PYDOC_SUFFIX)], text)


def dictd_number(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 64 + _DICTD_DIGITS.index(digit)
    return value


def dictd_entries(jargon_dir: Path) -> Iterator[tuple[str, str]]:
    """(index headword, entry text) pairs in index order; offsets refer to the inflated dict."""
    data = gzip.decompress((jargon_dir / "jargon.dict.dz").read_bytes())
    with open(jargon_dir / "jargon.index", encoding="utf-8") as index:
        for line in index:
            headword, offset, length = line.rstrip("\n").split("\t")
            start = dictd_number(offset)
            yield headword, data[start:start + dictd_number(length)].decode("utf-8")


def jargon_records(jargon_dir: Path) -> Iterator[Record]:
    taken: set[str] = set()
    for headword, entry in dictd_entries(jargon_dir):
        if headword.startswith("00-database"):
            continue
        text = entry.strip("\n").rstrip()
        if len(text) < MIN_JARGON_CHARS:
            continue
        # The index folds case; the entry's first line keeps the headword as the File spells it.
        first_line = text.split("\n", 1)[0].strip()
        title = first_line if first_line.lower() == headword.lower() else headword
        yield Record(unique_key(f"jargon/{title}", taken), title, text)


def jargon_metadata(jargon_dir: Path, name: str) -> str:
    for headword, entry in dictd_entries(jargon_dir):
        if headword == name:
            # dictfmt may repeat the headword as the entry's first line.
            return entry.strip("\n").removeprefix(name).strip("\n").rstrip()
    raise SystemExit(f"{jargon_dir}: no {name} entry in jargon.index")


def write_jsonl_gz(path: Path, records: Iterable[Record]) -> int:
    count = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                 compresslevel=9) as out:
        for record in records:
            line = json.dumps({"id": record.id, "title": record.title, "text": record.text},
                              ensure_ascii=False)
            out.write(line.encode("utf-8") + b"\n")
            count += 1
    return count


def python_licence(sources: Path) -> str:
    """The terms section of license.rst, through the zero-clause BSD licence for doc examples."""
    lines = (sources / f"license{PYDOC_SUFFIX}").read_text(encoding="utf-8").splitlines()
    start = lines.index("Terms and conditions for accessing or otherwise using Python")
    end = lines.index(".. _OtherLicenses:", start)
    # Sphinx substitutes |release| when it renders the page; do the same.
    return "\n".join(lines[start:end]).strip().replace("|release|", PYTHON_RELEASE)


def licence_notice(sources: Path, jargon_dir: Path) -> str:
    copyright_text = (sources / f"copyright{PYDOC_SUFFIX}").read_text(encoding="utf-8").strip()
    return f"""# Licences of the bundled sample data

The files in this folder are generated by `scripts/build_sample_corpus.py`; they are not covered
by the project's Apache-2.0 licence but by the terms of their sources, reproduced below.

- `pydocs.jsonl.gz`: the Python {PYTHON_RELEASE} documentation, built from its reST sources
  (`_sources/**/*.rst.txt`) as shipped in {PYDOC_PACKAGE}.
  Licence: PSF License Agreement; code examples also Zero-Clause BSD.
- `jargon.jsonl.gz`: the Jargon File 4.4.7, dictd edition (`jargon.index`, `jargon.dict.dz`),
  as shipped in {JARGON_PACKAGE}. Licence: public domain.

## How the files were built

```
python scripts/build_sample_corpus.py --pydoc-sources .../usr/share/doc/python3.11/html/_sources \\
    --jargon-dir .../usr/share/dictd --out synth/sample_data
```

- `pydocs.jsonl.gz`: every documentation page split into sections at its reST headings; one JSON
  object per section, `{{"id": "<page>#<section-slug>", "title": ..., "text": ...}}`, where the
  text is the section's reST source, heading included. Sections under {MIN_SECTION_CHARS}
  characters are left out. The text is otherwise unmodified.
- `jargon.jsonl.gz`: one JSON object per Jargon File entry, `{{"id": "jargon/<headword>", "title":
  ..., "text": ...}}`, with the entry text as dictd serves it. The dictd metadata entries and
  entries under {MIN_JARGON_CHARS} characters (mostly bare cross-references) are left out.

## Python documentation

The Python documentation's copyright notice (`copyright.rst`):

```rst
{copyright_text}
```

Its licence terms (`license.rst`, section "Terms and conditions for accessing or otherwise using
Python"; `|release|` rendered as {PYTHON_RELEASE}):

```rst
{python_licence(sources)}
```

## The Jargon File

{jargon_metadata(jargon_dir, "00-database-short").strip()}

The notice distributed with the dictd edition (its `00-database-info` entry):

```
{jargon_metadata(jargon_dir, "00-database-info")}
```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pydoc-sources", type=Path, required=True,
                        help="the _sources folder of the Python HTML documentation")
    parser.add_argument("--jargon-dir", type=Path, required=True,
                        help="folder with jargon.index and jargon.dict.dz")
    parser.add_argument("--out", type=Path, default=Path("synth/sample_data"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "pydocs.jsonl.gz": pydoc_records(args.pydoc_sources),
        "jargon.jsonl.gz": jargon_records(args.jargon_dir),
    }
    for name, records in outputs.items():
        count = write_jsonl_gz(args.out / name, records)
        print(f"{args.out / name}: {count} records, {(args.out / name).stat().st_size} bytes")
    notice = args.out / "LICENSE-SAMPLE-DATA.md"
    notice.write_text(licence_notice(args.pydoc_sources, args.jargon_dir), encoding="utf-8")
    print(f"{notice}: {notice.stat().st_size} bytes")


if __name__ == "__main__":
    main()
