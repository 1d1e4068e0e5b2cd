"""`nextlong-synth inspect`: one synthesized sequence cut back into the pieces it was packed from,
as a compact text view or a static HTML page (inline CSS, no script, nothing fetched).

A sequence is cut at its recorded `piece_starts`, at each BOS, and wherever the role or segment
changes, which also sets apart the padding and a joiner whose chunk was cut off at a segment's end
(unless it has the role of the piece before it: then it ends that piece, one newline longer).
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextlong_contract.reader import parser, read_output
from nextlong_contract.schema import MANIFEST, ROLE_NAMES, ROLE_NEGATIVE, ROLE_PAD, Manifest, ManifestError
from synth.errors import SynthError
from nextlong_contract.tokenizer import TextTokenizer, load_tokenizer


@dataclass(frozen=True)
class Span:
    """A run of tokens of one role and segment: a placed chunk (its joiner included), a BOS, a joiner whose
    chunk was cut off, or padding."""

    start: int  # token offset in the sequence
    role: str  # "meta", "negative" or "pad"
    kind: str  # "meta-chunk", "negative", "BOS", "joiner" or "padding"
    segment: int  # 0 for padding
    ids: np.ndarray
    weights: np.ndarray  # loss weight of each token
    # Text of each run of tokens of equal loss weight, so a page can mark those whose weight differs.
    # Padding is not decoded: 128K pad tokens would say nothing 128K times.
    parts: tuple[tuple[float, str], ...]
    source: str | None = None  # a negative's corpus chunk, DOC_ID#CHUNK
    score: float | None = None  # a negative's cosine to the meta-chunk it was mined for

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.parts)


@dataclass(frozen=True)
class Inspected:
    out: Path
    index: int  # over the whole output, in manifest shard order
    total: int  # sequences in the output
    shard: str
    record: int  # index within the shard
    strategy: str
    seq_len: int
    tokenizer: str
    meta_doc_ids: tuple[str, ...]
    spans: tuple[Span, ...]

    def tokens_by_role(self) -> Counter:
        counts = Counter({name: 0 for name in ("meta", "negative", "pad")})
        for span in self.spans:
            counts[span.role] += len(span.ids)
        return counts


def read_example(out: Path, index: int) -> tuple[Manifest, str, int, int, dict]:
    """(manifest, shard file, record within it, total sequences, parsed example) of sequence `index`."""
    import tensorflow as tf

    try:
        output = read_output(out)
    except ManifestError as e:
        raise SynthError(str(e)) from None
    manifest = output.manifest
    total = sum(shard.sequences for shard in manifest.shards)
    if not 0 <= index < total:
        raise SynthError(f"--index {index} is out of range: {out} holds {total} sequences"
                         + (f" (0 to {total - 1})" if total else ""))
    record = index
    for shard, path in zip(manifest.shards, output.shard_files):
        if record < shard.sequences:
            break
        record -= shard.sequences
    dataset = tf.data.TFRecordDataset(path, compression_type=manifest.tf_compression)
    raw = next(iter(dataset.skip(record).take(1)))
    example = {k: v.numpy() for k, v in parser(manifest.seq_len, with_provenance=True)(raw).items()}
    return manifest, shard.file, record, total, example


def spans(example: dict, tokenizer: TextTokenizer) -> list[Span]:
    """The pieces of one parsed sequence, in order; their ids concatenated are its input_ids."""
    ids, roles, segments = example["input_ids"], example["token_roles"], example["segment_ids"]
    weights = example["loss_weights"]
    starts = set(example["piece_starts"].tolist())
    if not starts and roles.any():
        raise SynthError("this output records no piece_starts (written by an older nextlong-synth): "
                         "re-synthesize it to inspect it")
    changes = np.r_[True, (roles[1:] != roles[:-1]) | (segments[1:] != segments[:-1])]
    bos = (ids == tokenizer.bos_id) & (roles != ROLE_PAD)
    bounds = np.union1d(np.flatnonzero(changes | bos | np.r_[False, bos[:-1]]), example["piece_starts"]).tolist()
    negatives = [start for start in bounds if start in starts and roles[start] == ROLE_NEGATIVE]
    sources = [v.decode("utf-8") for v in example["negative_chunk_ids"]]
    if len(negatives) != len(sources) or len(sources) != len(example["negative_scores"]):
        raise SynthError(f"{len(negatives)} negative pieces but {len(sources)} negative_chunk_ids and "
                         f"{len(example['negative_scores'])} negative_scores: inconsistent provenance")
    provenance = dict(zip(negatives, zip(sources, example["negative_scores"].tolist())))
    result = []
    for start, end in zip(bounds, bounds[1:] + [len(ids)]):
        role = int(roles[start])
        if role == ROLE_PAD:
            kind = "padding"
        elif start in starts:
            kind = "negative" if role == ROLE_NEGATIVE else "meta-chunk"
        else:
            kind = "BOS" if bos[start] else "joiner"
        piece_weights = weights[start:end]
        source, score = provenance.get(start, (None, None))
        result.append(Span(start, ROLE_NAMES[role], kind, int(segments[start]), ids[start:end], piece_weights,
                           _parts(ids[start:end], piece_weights, tokenizer, role), source, score))
    return result


def _parts(ids: np.ndarray, weights: np.ndarray, tokenizer: TextTokenizer, role: int) -> tuple:
    runs = np.flatnonzero(np.r_[True, weights[1:] != weights[:-1]]).tolist() + [len(ids)]
    return tuple((float(weights[a]), "" if role == ROLE_PAD else tokenizer.decode(ids[a:b].tolist()))
                 for a, b in zip(runs, runs[1:]))


def inspect(out: Path, index: int) -> Inspected:
    """Sequence `index` of the output in `out`, decoded with the tokenizer its run used."""
    manifest, shard, record, total, example = read_example(out, index)
    tokenizer = manifest.extra.get("config", {}).get("tokenizer")
    if tokenizer is None:
        raise SynthError(f"{out / MANIFEST} does not say which tokenizer its run used (config.tokenizer)")
    return Inspected(out, index, total, shard, record, manifest.extra.get("strategy", "unknown"), manifest.seq_len,
                     tokenizer, tuple(v.decode("utf-8") for v in example["meta_doc_ids"]),
                     tuple(spans(example, load_tokenizer(tokenizer))))


def _weight(value: float) -> str:
    return f"{value:g}"


def _label(span: Span) -> str:
    """What a piece is, where it starts, its length, and for a negative its source and cosine."""
    label = f"{span.kind} @{span.start} ({len(span.ids)} token{'s' if len(span.ids) > 1 else ''})"
    if span.source is not None:
        label += f" · {span.source} · cos {span.score:.3f}"
    if len(span.parts) == 1 and span.parts[0][0] != 1.0:
        label += f" · weight {_weight(span.parts[0][0])}"
    return label


def render_text(view: Inspected, width: int = 72) -> str:
    """One line per piece, its text cut to `width` characters."""
    counts = view.tokens_by_role()
    lines = [f"{view.out} sequence {view.index} of {view.total} ({view.shard}, record {view.record})",
             f"strategy {view.strategy}, seq_len {view.seq_len}, tokenizer {view.tokenizer}; tokens: "
             + ", ".join(f"{role} {counts[role]}" for role in ("meta", "negative", "pad")),
             f"meta-documents: {', '.join(view.meta_doc_ids) or '-'}"]
    for span in view.spans:
        text = repr(span.text)[1:-1]
        marks = "".join(f" [weight {_weight(w)}: {repr(t)[1:-1][:20]}]" for w, t in span.parts
                        if w != 1.0 and len(span.parts) > 1)
        lines.append(f"seg {span.segment:<3} {_label(span)}{marks}"
                     + (f"  {text[:width]}{'…' if len(text) > width else ''}" if text else ""))
    return "\n".join(lines) + "\n"


# Role backgrounds are distinct, flat colours (a test finds both in a screenshot); segments take turns
# through a palette for the band beside them.
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 16px 24px; color: #1b1b1b; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 0 0 12px; }
dt { color: #555; } dd { margin: 0; }
.key span { padding: 1px 8px; margin-right: 8px; border-radius: 3px; }
section { border-left: 8px solid var(--band); padding: 2px 0 2px 10px; margin: 12px 0; }
section > h2 { font-size: 13px; margin: 0 0 4px; color: #333; }
.p { margin: 3px 0; padding: 3px 8px; border-radius: 3px; }
.l { display: block; font: 11px ui-monospace, monospace; color: #3a3a3a; }
.t { white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.4 ui-monospace, monospace; }
.meta { background: #cde3ff; } .negative { background: #ffd8b0; } .pad { background: #e4e4e4; }
.w { outline: 2px dotted #c0002a; } .w sub { font: 10px sans-serif; color: #c0002a; }
.s0 { --band: #1f77b4; } .s1 { --band: #d62728; } .s2 { --band: #2ca02c; } .s3 { --band: #9467bd; }
.s4 { --band: #8c564b; } .s5 { --band: #e377c2; } .s6 { --band: #17becf; } .s7 { --band: #bcbd22; }
.spad { --band: #b0b0b0; }
"""


def _span_html(span: Span) -> str:
    if len(span.parts) == 1:
        body = html.escape(span.text)
    else:  # mark the tokens whose loss weight is not 1 (the first of a segment, without a BOS)
        body = "".join(html.escape(text) if weight == 1.0 else
                       f'<span class="w">{html.escape(text)}<sub>w{_weight(weight)}</sub></span>'
                       for weight, text in span.parts)
    return (f'<div class="p {span.role}"><span class="l">{html.escape(_label(span))}</span>'
            f'<span class="t">{body}</span></div>')


def render_html(view: Inspected) -> str:
    """A self-contained page: pieces coloured by role, grouped by segment, each labelled."""
    counts = view.tokens_by_role()
    facts = {"output": str(view.out), "sequence": f"{view.index} of {view.total}",
             "shard": f"{view.shard}, record {view.record}", "strategy": view.strategy,
             "seq_len": str(view.seq_len), "tokenizer": view.tokenizer,
             "tokens": ", ".join(f"{role} {counts[role]}" for role in ("meta", "negative", "pad")),
             "negatives": str(sum(span.source is not None for span in view.spans)),
             "meta-documents": ", ".join(view.meta_doc_ids) or "-"}
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(f'{view.out} sequence {view.index}')}</title>", f"<style>{_CSS}</style>",
           "</head><body>", f"<h1>nextlong-synth inspect: sequence {view.index}</h1>", "<dl>"]
    out += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items()]
    out += ["</dl>", '<p class="key"><span class="meta">meta-chunk</span><span class="negative">hard negative</span>'
            '<span class="pad">padding</span>loss weights other than 1 are given; the band at the left '
            "changes colour with the segment</p>"]
    segment = None
    for span in view.spans:
        if span.segment != segment:
            if segment is not None:
                out.append("</section>")
            segment = span.segment
            band, title = (f"s{(segment - 1) % 8}", f"segment {segment}") if segment else ("spad", "padding")
            out.append(f'<section class="{band}"><h2>{title}</h2>')
        out.append(_span_html(span))
    if segment is not None:
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
