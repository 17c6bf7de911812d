"""Progress bars that suit where the output goes: tqdm's live bar on a terminal; elsewhere (a log file,
CI, a pipe) a plain line every tenth of the total, never a redraw or an escape code, and nothing for a
transient bar (``leave=False``), which a terminal would not keep either."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_LINES = 10  # off a terminal, a line per tenth of the total ...
PLAIN_SECONDS = 30.0  # ... or, when the total is unknown, at most one this often
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
UNSIZED_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]"


class progress(tqdm):  # noqa: N801 - used as tqdm is, in its place
    """tqdm, which off a terminal prints a whole line at 0%, each further tenth and the end, instead of
    redrawing."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self.plain = not (hasattr(stream, "isatty") and stream.isatty())
        if self.plain:
            kwargs["disable"] = kwargs.get("disable") or kwargs.get("leave", True) is False
            sized = kwargs.get("total") is not None or (args and hasattr(args[0], "__len__"))
            kwargs.setdefault("bar_format", PLAIN_FORMAT if sized else UNSIZED_FORMAT)
            kwargs["dynamic_ncols"], kwargs["leave"] = False, False
        self.shown, self.shown_at = -1, 0.0
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        """Whether a plain line is due now: a new tenth of a known total, else ``PLAIN_SECONDS`` since
        the last."""
        if self.total:
            tenth = int(PLAIN_LINES * min(self.n, self.total) / self.total)
            if tenth > self.shown:
                self.shown = tenth
                return True
            return False
        if self.shown < 0 or time.monotonic() - self.shown_at >= PLAIN_SECONDS:
            self.shown, self.shown_at = max(self.shown, 0), time.monotonic()
            return True
        return False

    def display(self, msg=None, pos=None):
        if not self.plain:
            return super().display(msg, pos)
        if msg is None and self._due():
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        return False  # so that close() writes no carriage return

    def close(self):
        finished = bool(self.total) and self.n >= self.total
        if self.plain and not self.disable and finished and self.shown < PLAIN_LINES:
            self.display()
        super().close()
