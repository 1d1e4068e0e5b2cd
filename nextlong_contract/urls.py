"""Locations given as URLs (gs://, s3://, ...): both sides read and write them through Apache Beam's
filesystems, imported only when a URL is met, so a local run needs no Beam."""

from __future__ import annotations

import re

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str) -> bool:
    """Whether a location (an input, the output, a shard) is a URL (gs://, s3://, ...) rather than a local path."""
    return bool(_URL.match(location))


def url_filesystems(error: type[Exception]):
    """Apache Beam's `FileSystems`, through which both sides read and write URLs (every scheme Beam
    knows). Without Beam, raises `error`, the caller's own type, so its command reports one line."""
    try:
        from apache_beam.io.filesystems import FileSystems
    except ModuleNotFoundError:
        raise error("a location given as a URL (gs://, s3://, ...) is read through Apache Beam's filesystems: pip "
                    "install 'nextlong-jax[beam]' and the filesystem's extra, e.g. 'apache-beam[gcp]'") from None
    return FileSystems
