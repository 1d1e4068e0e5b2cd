"""A run's persistent compilation cache: a restart (after a preemption, a crash, a new stage) loads the
programs jax compiled before instead of compiling them again, minutes for an 8B step on a slice.

jax keys an entry by the program, its compile options, the devices and the jax/XLA versions, so a hit
is the executable a fresh compile would give; a changed step is a new key. `JAX_COMPILATION_CACHE_DIR`,
where set, is the user's choice and wins over the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import jax

_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}


@dataclass
class CompilationCache:
    """Where this process's compiled programs are kept, and how many it loaded and compiled."""

    directory: str
    counts: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})

    def _count(self, event: str, **_) -> None:
        if event in _EVENTS:
            self.counts[_EVENTS[event]] += 1

    def summary(self) -> str:
        return (f"compilation cache {self.directory}: {self.counts['hits']} program(s) loaded, "
                f"{self.counts['misses']} compiled and kept")

    def close(self) -> None:
        jax.monitoring.unregister_event_listener(self._count)


def use_compilation_cache(setting: str, run_dir: Path | str) -> CompilationCache | None:
    """Turn on jax's persistent cache for this process: `setting` "auto" keeps it in the run's
    directory (RUN/jax-cache), "off" keeps none, anything else is the directory (local or a URL)."""
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not directory:
        if setting == "off":
            return None
        directory = f"{str(run_dir).rstrip('/')}/jax-cache" if setting == "auto" else setting
        jax.config.update("jax_compilation_cache_dir", directory)
        # Every program, not only those over jax's default one second: a restart then compiles nothing.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cache = CompilationCache(directory)
    jax.monitoring.register_event_listener(cache._count)
    return cache
