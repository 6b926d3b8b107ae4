"""The package's one way to write a file atomically: readers see the old file or the new one, never half.

Why one helper: results, feature-store chunks, baselines and model cards are all read by other
processes (the book build, a resumed extraction, CI) that may run while a write is killed. Each
write goes to a temporary file in the same directory, is flushed and fsync'ed, then renamed into
place with ``os.replace``; on any failure the temporary file is removed and the old file stays.
(``vrp_utils/data/benchmark.py`` keeps its own copy: its source is part of the benchmark's build
key, so editing it would rebuild the benchmark and retrain the zoo.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(binary_handle)`` on a temporary file beside ``path``, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    data = text.encode()
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike[str], payload: Any, **dumps: Any) -> None:
    """Write ``payload`` as JSON (``json.dumps`` options in ``dumps``) plus a newline, atomically."""
    atomic_write_text(path, json.dumps(payload, **dumps) + "\n")
