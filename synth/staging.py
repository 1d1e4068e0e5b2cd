"""Output and cache directories at a URL (gs://, s3://, ...), for Beam runners whose workers share no
disk (Dataflow, a Flink or Spark cluster without a shared mount).

The stages still read and write local files: memory-mapped blocks, FAISS's on-disk inverted lists and
TFRecord writers need them. So each machine stages a URL directory under one local path, the same on
every machine (`staging_dir`, so the paths inside pickled stage inputs hold everywhere), pulls the files
a stage reads and pushes the files it finishes, the file that marks a directory complete last. The URL
is the record of what is done: a local file is never taken for done by itself. Whole cache directories
(blocks, indexes) are pulled only where the local copy's size differs, since every cache name derives
from what made it (the cache keys), so a name always holds the same bytes; single files (reports, the
run's configuration) are always pulled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nextlong_contract.urls import is_url
from synth.errors import SynthError
from synth.files import beam_filesystems, match_urls, open_binary, temporary_name, temporary_sibling

if TYPE_CHECKING:
    from synth.config import OutputConfig

STAGING_ROOT = Path(tempfile.gettempdir()) / "nextlong-synth-staging"


def staging_dir(url: str) -> Path:
    """The local directory that stands for `url` on every machine."""
    return STAGING_ROOT / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def local_or_staged(location: str) -> tuple[Path, str | None]:
    """(the directory stages write to, the URL it is pushed to or None) for an --out or --cache-dir value."""
    if is_url(location):
        url = location.rstrip("/")
        return staging_dir(url), url
    return Path(location), None


def _uncompressed():
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.UNCOMPRESSED


@dataclass(frozen=True)
class Mirror:
    """Pulls and pushes the files of staged directories; for a path under none, every call is about the
    local file alone, so stages call it whatever the configuration."""

    roots: tuple[tuple[Path, str], ...] = ()  # (staging directory, its URL), the deepest first

    @classmethod
    def of(cls, output: OutputConfig) -> "Mirror":
        """The staged directories of an `OutputConfig`: its output and its cache, where they are URLs."""
        roots = [(output.cache, output.cache_url)] if output.cache_url else []
        if output.out_url:
            roots.append((output.out, output.out_url))
        return cls(tuple(roots))

    def url(self, path: Path) -> str | None:
        for local, url in self.roots:
            if path == local or local in path.parents:
                relative = path.relative_to(local).as_posix()
                return url if relative == "." else f"{url}/{relative}"
        return None

    def exists(self, path: Path) -> bool:
        """Whether the file is done: at its URL, or on the local disk for a path not staged."""
        url = self.url(path)
        return path.is_file() if url is None else beam_filesystems().exists(url)

    def pull(self, path: Path) -> bool:
        """Make the local file the URL's; False when the URL has none (a local leftover is not trusted)."""
        url = self.url(path)
        if url is None:
            return path.is_file()
        if not beam_filesystems().exists(url):
            return False
        self._download(url, path)
        return True

    def pull_dir(self, directory: Path, marker: str) -> bool:
        """Every file of a directory whose `marker` file says it is complete; False when it is not."""
        url = self.url(directory)
        if url is None:
            return (directory / marker).is_file()
        if not beam_filesystems().exists(f"{url}/{marker}"):
            return False
        for found in match_urls(f"{url}/**"):
            relative = found.path[len(url) + 1:]
            local = directory / relative
            if local.name.startswith("."):
                continue  # another writer's temporary file (`files.temporary_name`)
            if not (local.is_file() and local.stat().st_size == found.size_in_bytes):
                self._download(found.path, local)
        return True

    def push(self, path: Path) -> None:
        """Publish the local file at its URL, whole or not at all."""
        url = self.url(path)
        if url is None:
            return
        parent, _, name = url.rpartition("/")
        partial = f"{parent}/{temporary_name(name)}"
        filesystems = beam_filesystems()
        with open(path, "rb") as source, filesystems.create(partial, compression_type=_uncompressed()) as target:
            shutil.copyfileobj(source, target, 1 << 24)
        filesystems.rename([partial], [url])

    def push_dir(self, directory: Path, marker: str) -> None:
        """Publish a complete directory, its `marker` file last, so that a reader never takes a partial
        upload for a finished one."""
        if self.url(directory) is None:
            return
        files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
        if directory / marker not in files:
            raise SynthError(f"{directory} has no {marker}: it is not complete, so it is not published")
        for path in files:
            if path.name != marker or path.parent != directory:
                self.push(path)
        self.push(directory / marker)

    def pull_store(self, blocks: tuple[Path, ...], embedding_name: str) -> None:
        """The blocks of a chunk store, for a stage that reads the store."""
        for block in blocks:
            if not self.pull_dir(block, embedding_name):
                raise SynthError(f"{self.url(block)} is not complete; run the same command again to rebuild it")

    @staticmethod
    def _download(url: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = temporary_sibling(path)
        with open_binary(url) as source, open(partial, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 24)
        os.replace(partial, path)
