"""One driver per run: a lease file in the run folder (local or in the bucket), and the fence that
every write into the run passes.

``<run>/lease.json`` holds the driver's host, pid (with its boot and start tick, which a reused pid
does not share), start time, a random token and ``beat``, a counter that a background thread raises
every ``heartbeat_every`` seconds. A second driver with the same run name is refused at once, naming
the holder. A holder is gone when its process is gone from this host (taken over at once), or, on
another host, when its counter stands still for ``stale_after`` seconds of this host's monotonic
clock: no two hosts' clocks are ever compared, and a holder whose process is alive on this host is
never taken over.

A driver whose lease was taken writes nothing more: :class:`Fence` ``hold()`` wraps every checkpoint
rename, prune and metrics append in the lease's lock and refuses it (:class:`LeaseLost`) unless the
lease still holds the writer's token; ``check()``, at every step, stops the loop with that one line.
On a bucket there is no lock: the token is read before each write (a write may still land within the
read's round trip).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from selfsup.core import storage
from selfsup.core.fence import LeaseLost, RunLeaseError

__all__ = ["LEASE", "Fence", "LeaseLost", "RunLease", "RunLeaseError", "run_lease"]

log = logging.getLogger("selfsup.lease")
LEASE = "lease.json"
LOCK = f".{LEASE}.lock"  # never replaced or deleted: flock holds on its inode (set_aside keeps .lease.json.*)
LOCK_WAIT_S = 30.0  # a takeover waits this long for a writer inside hold() (a paused one keeps it)


_UNSEEN = object()


def wall_clock() -> float:
    """The time written into the lease for people to read (never compared across drivers)."""
    return time.time()


def _process(pid: int) -> str | None:
    """This host's boot and the start of process ``pid`` (in clock ticks since boot): the same pid after
    a reboot or reused by another process differs. None where /proc cannot tell (not Linux, gone)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime (the name may hold ')')


def _holder_alive(held: dict) -> bool:
    """Whether the process of a lease taken on this host still runs (the very process, not its pid's reuse)."""
    pid = int(held["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    now = _process(pid)
    return held.get("process") is None or now is None or now == held["process"]


def _read(url: str) -> dict | None:
    """The lease at ``url``: None when there is none, {} when it is unreadable."""
    try:
        if not storage.is_remote(url):  # plain open: storage.open_read's local reader loads torch
            return json.loads(Path(url).read_bytes())
        with storage.open_read(url) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


class Fence:
    """The right of lease ``token`` to write into the run at ``location`` (a path or a bucket URL).
    Any process can hold one (Ray workers get the driver's token); it never writes the lease."""

    def __init__(self, location: str | Path, token: str, check_every: float = 5.0):
        self.location, self.token = str(location).rstrip("/"), token
        self.url = f"{self.location}/{LEASE}"
        self.check_every = check_every  # a bucket's lease is read at most this often by check()
        self.lost: str | None = None
        self._seen: object = _UNSEEN  # the lease file's (inode, mtime, size) when last verified; a bucket's time

    @contextlib.contextmanager
    def locked(self, wait: float | None = None):
        """The lease's lock (local folders; a bucket has none). ``wait``: seconds before giving up
        with :class:`RunLeaseError` (None: wait as long as it takes)."""
        if storage.is_remote(self.url):
            yield
            return
        Path(self.location).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(self.location) / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + wait if wait is not None else None
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise RunLeaseError(
                            f"the lease of {self.location} stays locked by a driver that is "
                            "writing (or paused mid-write); wait for it, or stop it"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _verify(self) -> None:
        held = _read(self.url)
        if held is not None and held.get("token") == self.token:
            return
        by = f"pid {held.get('pid')} on {held.get('host')}" if held else "nobody (the lease file is gone)"
        self.lost = (
            f"the lease of {self.location} was taken over by {by}; this driver stopped and wrote "
            "nothing more (the run goes on under its new driver)"
        )
        raise LeaseLost(self.lost)

    @contextlib.contextmanager
    def hold(self):
        """Run the block (a rename, a prune, an append) only while this token holds the lease, under its
        lock; else raise :class:`LeaseLost` and run nothing."""
        if self.lost:
            raise LeaseLost(self.lost)
        with self.locked():
            self._verify()
            yield

    def check(self) -> None:
        """Raise :class:`LeaseLost` once the lease is another's. Cheap enough for every step: a local
        lease is re-read only when its file changed (a stat), a bucket's every ``check_every`` s."""
        if self.lost:
            raise LeaseLost(self.lost)
        if storage.is_remote(self.url):
            now = time.monotonic()
            if isinstance(self._seen, float) and now - self._seen < self.check_every:  # a bucket's: a time
                return
            self._verify()
            self._seen = now
            return
        try:
            st = os.stat(self.url)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen is not None and seen == self._seen:
            return
        self._verify()
        self._seen = seen


class RunLease:
    """The lease of run folder ``location`` (a path, or an s3:// / gs:// URL); use as a context manager.
    ``host`` names this driver's host (a test may pose as another)."""

    def __init__(
        self, location: str | Path, stale_after: float = 60.0, heartbeat_every: float = 10.0, host: str | None = None
    ):
        self.location = str(location).rstrip("/")
        self.url = f"{self.location}/{LEASE}"
        self.stale_after, self.heartbeat_every = stale_after, heartbeat_every
        self.record: dict[str, Any] = {
            "host": host or socket.gethostname(),
            "pid": os.getpid(),
            "process": _process(os.getpid()),
            "started": wall_clock(),
            "token": uuid.uuid4().hex,
        }
        self.beat = 0
        self.fence = Fence(self.location, self.record["token"])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        data = json.dumps({**self.record, "beat": self.beat, "heartbeat": wall_clock()}).encode()
        if storage.is_remote(self.url):
            storage.write_bytes(self.url, data)
            return
        path = Path(self.url)
        tmp = path.with_name(f".{LEASE}.{self.record['token']}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _claim_new(self) -> bool:
        """Create the lease where none exists; False when another driver created it first."""
        if storage.is_remote(self.url):
            self._write()
            return True
        path = Path(self.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({**self.record, "beat": self.beat, "heartbeat": wall_clock()}))
        return True

    def _gone(self, held: dict) -> bool:
        """Whether the holder of ``held`` is gone: its process is dead on this host, or (another host, or
        an unreadable lease) the lease does not change for ``stale_after`` seconds of this host's clock."""
        if held.get("host") == self.record["host"] and "pid" in held:
            return not _holder_alive(held)
        log.info(
            "the lease of %s is held by pid %s on %s; watching its heartbeat for up to %.0f s",
            self.location,
            held.get("pid"),
            held.get("host"),
            self.stale_after,
        )
        deadline = time.monotonic() + self.stale_after
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat_every / 4, max(deadline - time.monotonic(), 0)))
            if _read(self.url) != held:
                return False
        return True

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunLeaseError` naming the live holder."""
        held = _read(self.url)
        if held is None and self._claim_new():
            held = _read(self.url)
        elif held is not None and self._gone(held):
            with self.fence.locked(wait=LOCK_WAIT_S):  # not while the old holder is inside hold()
                if _read(self.url) == held:
                    log.warning(
                        "taking over the stale lease of %s (pid %s on %s, which stopped beating)",
                        self.location,
                        held.get("pid"),
                        held.get("host"),
                    )
                    self._write()
            held = _read(self.url)
        else:
            held = held if held is not None else _read(self.url)
        if not held or held.get("token") != self.record["token"]:
            self._refuse(held or {})
        self._thread = threading.Thread(target=self._beat, name="selfsup-lease", daemon=True)
        self._thread.start()

    def _refuse(self, held: dict) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
        raise RunLeaseError(
            f"run folder {self.location} is in use by another driver (pid {held.get('pid')} on "
            f"{held.get('host')}, since {since} on its clock); wait for it to finish, stop it, "
            "or pick another name=..."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                with self.fence.hold():
                    self.beat += 1
                    self._write()
            except LeaseLost as err:  # the fence stays lost: the loop's next check says it, in one line
                log.debug("%s", err)
                return
            except OSError as err:  # a bucket that did not answer: the next beat tries again
                log.warning("could not refresh the lease of %s (%s)", self.location, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(LeaseLost), self.fence.hold():
            storage.delete(self.url)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_lease(cfg) -> RunLease:
    """The lease of an ``ExperimentConfig``'s run folder: in its bucket when ``run_root`` is a URL, else local."""
    return RunLease(cfg.run_url or Path(cfg.run_dir).resolve())
