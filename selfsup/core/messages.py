"""Error text as selfsup's one-line messages quote it."""

from __future__ import annotations

import re


def decoder_reason(err: Exception) -> str:
    """A decoder's error as a reason: its type and message, without the in-memory file that PIL and
    libsndfile name in place of the file (the caller names the file)."""
    return f"{type(err).__name__}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-f]+>', '', str(err))}"
