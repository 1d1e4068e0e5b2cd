"""A synthesis option declared once, as the config dataclass field it sets.

`option(...)` makes a field whose metadata names its flag (also its YAML key), help group and argparse
keywords; the field's own default is the option's. The command line (`synth.cli`), the presets, each
help line's "(default: ...)" and the conversion of a flat value (a flag's string, a YAML scalar) into
the field's type all read that one declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from synth.errors import SynthError

IO = "inputs and output"
MODEL = "tokenizer, chunking, embedding, index"
LAYOUT = "negatives and layout"


@dataclass(frozen=True)
class Option:
    flag: str  # the YAML key, and the flag unless `cli` names another
    group: str
    help: str
    default: Any = None
    arguments: dict = field(default_factory=dict)  # argparse keywords: type, choices, metavar, action
    cli: str | None = None
    parse: Callable[[Any], Any] | None = None  # after `arguments`' type or choices: e.g. "auto" -> None

    @property
    def help_text(self) -> str:
        """The help line, ending in the default where there is one to state."""
        if not self.help or self.default is None or self.arguments.get("action") == "store_true":
            return self.help
        return f"{self.help} (default: {self.default})"

    def convert(self, value: Any) -> Any:
        """A flat value as the field holds it; one that does not convert is a SynthError naming the flag."""
        choices = self.arguments.get("choices")
        if choices is not None and str(value) not in choices:
            raise SynthError(f"--{self.flag} must be one of {', '.join(choices)}, not {value!r}")
        if self.arguments.get("action") == "store_true":
            return bool(value)
        kind = str if choices is not None else self.arguments.get("type", str)
        try:
            value = kind(value)
            return self.parse(value) if self.parse else value
        except (TypeError, ValueError):
            raise SynthError(f"--{self.flag}: {value!r} is not {'an integer' if kind is int else 'a number'}"
                             if kind in (int, float) else f"--{self.flag}: bad value {value!r}") from None


def option(flag: str, group: str, help: str, default: Any = dataclasses.MISSING, *, cli: str | None = None,
           parse: Callable[[Any], Any] | None = None, **arguments: Any) -> Any:
    """A dataclass field with default `default` that is also the option `flag`."""
    return field(default=default, metadata={"option": dict(flag=flag, group=group, help=help, cli=cli,
                                                             parse=parse, arguments=arguments)})


def declared(cls: type) -> list[tuple[str, Option]]:
    """(field name, option) for each field of `cls` declared with `option`, in field order."""
    return [(f.name, Option(default=getattr(f.default, "value", f.default), **f.metadata["option"]))
            for f in dataclasses.fields(cls) if "option" in f.metadata]


def field_default(cls: type, name: str) -> Any:
    """The default of `cls`'s field `name`, for an option that sets it in more than one place."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def read(cls: type, flat: dict, **given: Any) -> Any:
    """`cls` from the flat options `flat` holds for its declared fields (the others keep their defaults),
    plus the fields in `given`."""
    values = {name: option.convert(flat[option.flag]) for name, option in declared(cls)
              if flat.get(option.flag) is not None}
    return cls(**values, **given)
