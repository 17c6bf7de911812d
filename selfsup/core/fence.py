"""What a write into a run folder passes: the lease's fence (``selfsup.train.lease.Fence``) or none.

A fence has ``hold()``, a context manager that runs its block only while its driver holds the run's
lease (else raises ``LeaseLost`` and runs nothing), and ``check()``, which raises once the lease is
lost. Code below ``train`` takes one as a plain argument; None means no lease is held (a library call
or a test) and every write goes ahead. The errors live here so that the sinks in ``core`` can tell them.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

from selfsup.errors import OneLineError


class RunLeaseError(OneLineError, RuntimeError):
    """Another live driver holds the run's lease."""


class LeaseLost(RunLeaseError):
    """This driver's lease was taken over: it stops and writes nothing more."""


class Fence(Protocol):
    """What ``selfsup.train.lease.Fence`` offers the layers below it."""

    def hold(self) -> AbstractContextManager[object]: ...

    def check(self) -> None: ...


def fenced(fence: Fence | None) -> AbstractContextManager[object]:
    """``fence.hold()``, or a no-op without a fence."""
    return fence.hold() if fence is not None else contextlib.nullcontext()
