"""Silencing a library's warnings about itself for one call, and no longer."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def library_noise_silenced(logger_name: str, category: type[Warning] = Warning) -> Iterator[None]:
    """Within the block: ``logger_name`` (and its children) log errors only, and warnings of
    ``category`` are ignored; both are restored after."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category)
            yield
    finally:
        log.setLevel(level)
