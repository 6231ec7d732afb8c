"""Info lines that are worth saying once per process (a choice made the same way for every model built)."""

from __future__ import annotations

import logging
from typing import Any

_said: set[str] = set()


def info_once(logger: logging.Logger, message: str, *args: Any) -> None:
    """``logger.info(message % args)`` the first time this text is said in the process; later calls are silent."""
    text = message % args if args else message
    if text not in _said:
        _said.add(text)
        logger.info(text)
