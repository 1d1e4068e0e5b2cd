"""Are a dataset's token ids the model's? An embedding lookup takes any id, one beyond the vocabulary
clamped to its last row without a word, so the trainer and `nextlong-eval dependency` check here
before a model reads data: the tokenizer a synthesis output's manifest records (`nextlong_contract.schema`)
against the model's tokenizer and vocab_size, and the ids themselves as they are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nextlong_jax.data import DataError
from nextlong_contract.schema import vocabulary_sha256

RESYNTHESIZE = "re-synthesize the data with the model's tokenizer (nextlong-synth --tokenizer MODEL_DIR)"


def tokenizer_sha256(directory: Path) -> str:
    """`vocabulary_sha256` of the tokenizer.json in `directory`, as synthesis states it for its tokenizer."""
    import tokenizers

    path = directory / "tokenizer.json"
    try:
        vocab = tokenizers.Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise DataError(f"{path}: unreadable tokenizer ({' '.join(str(e).split())})") from None
    return vocabulary_sha256(vocab)


def check_vocabulary(record: dict[str, Any] | None, where: str, vocab_size: int, tokenizer: Path | None) -> None:
    """Raise unless an output's ids are the model's. `record`: its manifest's `tokenizer` (None in outputs
    that predate it); `tokenizer`: the model's tokenizer directory, if known (`convert.model_tokenizer`).
    Both vocabularies must be one where both are known, and the output's may not hold more ids than the
    model's `vocab_size` (which may be larger: embeddings padded to a round size)."""
    if not record:
        return
    name = record.get("name", "unknown")
    digest = record.get("vocab_sha256")
    if digest and tokenizer is not None and digest != tokenizer_sha256(tokenizer):
        raise DataError(f"{where}: its token ids are tokenizer {name}'s, not those of the model's tokenizer "
                        f"{tokenizer}: re-synthesize the data with --tokenizer {tokenizer}")
    size = record.get("vocab_size")
    if size is not None and size > vocab_size:
        raise DataError(f"{where}: its tokenizer {name} has {size} ids, more than the model's vocab_size "
                        f"{vocab_size}: {RESYNTHESIZE}")


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise if `ids` hold an id the model's embedding lacks."""
    top = int(ids.max(initial=0))
    if top >= vocab_size:
        raise DataError(f"{where}: token id {top} is beyond the model's vocab_size {vocab_size}: {RESYNTHESIZE}")
