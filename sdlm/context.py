"""A context variable set for the duration of a ``with`` block."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def setting(var: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """Inside, ``var`` holds ``value``; on leaving, what it held before (also after an exception)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
