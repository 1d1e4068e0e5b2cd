"""Errors the command line turns into one-line messages and a non-zero exit."""

from nextlong_contract.tokenizer import TokenizerError


class SynthError(Exception):
    """A problem the user can fix (missing path, unreadable file, bad flag, --strict violation)."""


# What a synthesis command reports as one line: its own errors and the shared tokenizer loader's.
USER_ERRORS = (SynthError, TokenizerError)
