"""The synthesis options: each declared once, as the config field it sets (flag, help, conversion, default)."""

from __future__ import annotations

from pathlib import Path

import yaml

from synth.cli import _parser
import pytest

from synth.config import OPTIONS, ChunkingConfig, MiningConfig, OutputConfig, SynthConfig, build_config
from synth.corpus import CorpusSpec
from synth.errors import SynthError
from synth.embed import EmbeddingConfig
from synth.index import IndexConfig

ROOT = Path(__file__).resolve().parents[1]


def test_no_flags_give_the_dataclass_defaults():
    config = build_config({"meta": "m.jsonl", "out": "o"})
    assert config == SynthConfig(meta=CorpusSpec("m.jsonl"), corpus=None, output=OutputConfig(out=Path("o")))
    assert (config.mining, config.embedding, config.index, config.chunking) == (
        MiningConfig(), EmbeddingConfig(), IndexConfig(), ChunkingConfig())


def test_every_option_is_a_flag_with_its_default_in_the_help_and_presets_use_only_options():
    text = " ".join(_parser().format_help().split())
    for option in OPTIONS:
        if option.help:
            assert f"--{option.cli or option.flag}" in text
            if option.default is not None and option.arguments.get("action") != "store_true":
                assert f"(default: {option.default})" in text, option.flag
    keys = {option.flag for option in OPTIONS}
    for preset in (ROOT / "configs" / "synth").glob("*.yaml"):
        assert set(yaml.safe_load(preset.read_text())) <= keys, preset.name


def test_a_preset_value_converts_as_its_flag_would():
    """YAML gives strings and numbers where the command line gives strings: both reach the same fields,
    and a value that does not convert names its option."""
    config = build_config({"meta": "m", "out": "o", "seq-len": "4096", "headroom": "1.25", "k": "auto", "max-k": "3",
                           "strategy": "knn-concat", "corpus-dedup": 0.8, "trust-remote-code": True})
    assert (config.output.seq_len, config.mining.headroom, config.mining.k, config.mining.max_k) == (4096, 1.25, None, 3)
    assert config.mining.strategy.value == "knn-concat" and config.mining.corpus_dedup == 0.8
    assert config.embedding.trust_remote_code is True
    with pytest.raises(SynthError, match="--seq-len: 'long' is not an integer"):
        build_config({"meta": "m", "out": "o", "seq-len": "long"})
    with pytest.raises(SynthError, match="--reuse-scope must be one of run, shard, not 'all'"):
        build_config({"meta": "m", "out": "o", "reuse-scope": "all"})
    with pytest.raises(SynthError, match="--num-shards must be at least 1"):
        build_config({"meta": "m", "out": "o", "num-shards": 0})
