"""Writing files so that a reader never sees half of one (caches shared by data-loader workers and DDP ranks)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(path: str | Path) -> Iterator[str]:
    """A temporary file name beside ``path`` (its folder is created) to write to; renamed onto ``path`` when the
    block succeeds (``os.replace``: atomic on one file system), removed when it raises.

    Raises:
        OSError: the folder cannot be created or the file cannot be written or renamed (re-raised as is).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
