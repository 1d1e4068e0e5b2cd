"""The synthesis options: one table, defaults read from the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import yaml

from synth.cli import _parser
from synth.config import OPTIONS, ChunkingConfig, MiningConfig, OutputConfig, SynthConfig, build_config
from synth.corpus import CorpusSpec
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
