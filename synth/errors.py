"""Errors the command line turns into one-line messages and a non-zero exit."""


class SynthError(Exception):
    """A problem the user can fix (missing path, unreadable file, bad flag, --strict violation)."""
