"""Exception groups, unwrapped by type.

Newer trio wraps whatever a nursery raises in an exception group.  A
nursery that is an implementation detail (the Endpoint's, a DHT node's, a
tracker client's) must not change what the caller's ``async with`` block
raises: :func:`unwrapped` lets the single exception inside out as itself.
:func:`leaves` and :func:`sole_leaf` take a group apart for reporting
(the ``ucat`` exit status).

This module imports neither trio nor anything heavy, so command-line tools
can use it before deciding to start trio.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterator

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["single", "leaves", "sole_leaf", "unwrapped"]


def single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups;
    ``exc`` itself when it is not such a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``exc``
    itself when it is not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def sole_leaf(exc: BaseException,
              ignore: tuple[type[BaseException], ...] = ()) -> BaseException:
    """The only leaf of ``exc`` that is not an instance of one of ``ignore``
    (e.g. trio.Cancelled); ``exc`` itself when there are several or none."""
    found = [e for e in leaves(exc) if not isinstance(e, ignore)]
    return found[0] if len(found) == 1 else exc


@asynccontextmanager
async def unwrapped() -> AsyncIterator[None]:
    """Re-raise a single exception that leaves the block inside (nested)
    one-member groups as itself; groups of several pass unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner = single(group)
        if inner is group:
            raise
        raise inner from None
