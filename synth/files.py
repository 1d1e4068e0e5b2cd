"""Where input files live: the local disk (paths), or any filesystem Apache Beam knows (URLs:
gs://, s3://, hdfs://, azfs://, with that filesystem's Beam extra installed).

Local paths never touch Beam, so the local runner needs no Beam install unless given a URL.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO

from nextlong_contract.urls import url_filesystems
from synth.errors import SynthError

Location = Path | str  # a local path, or a URL


def temporary_name(name: str) -> str:
    """A name for a file being written that no other writer uses: two workers may make the same output
    at once (a retried or duplicated Beam task, a rerun beside a lingering worker), and each renames
    its own. Hidden, so listings of finished files skip it."""
    return f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def temporary_sibling(path: Path) -> Path:
    return path.with_name(temporary_name(path.name))


def beam_filesystems():
    return url_filesystems(SynthError)


def open_binary(location: Location) -> BinaryIO:
    if isinstance(location, Path):
        return open(location, "rb")
    from apache_beam.io.filesystem import CompressionTypes

    # Uncompressed: the readers look at the bytes themselves (gzip magic, Parquet footer).
    return beam_filesystems().open(location, compression_type=CompressionTypes.UNCOMPRESSED)


def size(location: Location) -> int:
    if isinstance(location, Path):
        return location.stat().st_size
    return _metadata(location).size_in_bytes


def signature(location: Location) -> str:
    """What changes when the file does: its full name, size and modification time."""
    if isinstance(location, Path):
        stat = location.stat()
        return f"{location.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    found = _metadata(location)
    return f"{location}\0{found.size_in_bytes}\0{found.last_updated_in_seconds}"


def _metadata(url: str):
    found = match_urls(url)
    if len(found) != 1:
        raise SynthError(f"{url}: no such file")
    return found[0]


def match_urls(pattern: str) -> list:
    """Beam `FileMetadata` of the files a URL names (a file or a glob), sorted by path."""
    try:
        result = beam_filesystems().match([pattern])[0]
    except Exception as error:  # Beam raises its own errors per filesystem: name the URL with them
        if isinstance(error, SynthError):
            raise
        raise SynthError(f"cannot list {pattern}: {' '.join(str(error).split())}") from None
    return sorted(result.metadata_list, key=lambda m: m.path)


def url_files(url: str) -> tuple[str, list[str]] | None:
    """The files below a URL that names a folder: (the folder, their paths relative to it), or None
    when nothing is below it."""
    root = url.rstrip("/")
    below = match_urls(f"{root}/**")
    if not below:
        return None
    return root, [m.path[len(root) + 1:] for m in below]
