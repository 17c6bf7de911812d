"""One driver per run: a lease file in the run folder (local or in the bucket).

``<run>/lease.json`` holds the driver's host, pid, start time, a random token and a heartbeat that a
background thread refreshes. A second driver with the same run name is refused at once, naming the
holder. A lease whose holder is gone (its pid is dead on this host, or its heartbeat is older than
``stale_after`` seconds) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from selfsup.core import storage

log = logging.getLogger("selfsup.lease")
LEASE = "lease.json"


class RunLeaseError(RuntimeError):
    """Another live driver holds the run's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLease:
    """The lease of run folder ``location`` (a path, or an s3:// / gs:// URL); use as a context manager."""

    def __init__(self, location: str | Path, stale_after: float = 60.0, heartbeat_every: float = 10.0):
        self.location = str(location).rstrip("/")
        self.url = f"{self.location}/{LEASE}"
        self.stale_after, self.heartbeat_every = stale_after, heartbeat_every
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            if not storage.is_remote(self.url):  # plain open: storage.open_read's local reader loads torch
                return json.loads(Path(self.url).read_bytes())
            with storage.open_read(self.url) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written or unreadable: treat as stale
            return {}

    def _write(self) -> None:
        data = json.dumps({**self.record, "heartbeat": time.time()}).encode()
        if storage.is_remote(self.url):
            storage.write_bytes(self.url, data)
            return
        path = Path(self.url)
        tmp = path.with_name(f".{LEASE}.{self.record['token']}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _live(self, held: dict) -> bool:
        if not held or "heartbeat" not in held:
            return False
        if time.time() - float(held["heartbeat"]) > self.stale_after:
            return False
        if held.get("host") == self.record["host"]:
            return _pid_alive(int(held.get("pid", -1)))
        return True

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
            f.write(json.dumps({**self.record, "heartbeat": time.time()}))
        return True

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunLeaseError` naming the live holder."""
        held = self._read()
        if held is None and self._claim_new():
            held = self._read()
        elif held is not None and not self._live(held):
            if held:
                log.warning("taking over the stale lease of %s (pid %s on %s, last heartbeat %.0f s ago)",
                            self.location, held.get("pid"), held.get("host"), time.time() - float(held.get("heartbeat", 0)))
            self._write()
            held = self._read()
        else:
            held = held if held is not None else self._read()
        if not held or held.get("token") != self.record["token"]:
            self._refuse(held or {})
        self._thread = threading.Thread(target=self._beat, name="selfsup-lease", daemon=True)
        self._thread.start()

    def _refuse(self, held: dict) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
        raise RunLeaseError(f"run folder {self.location} is in use by another driver (pid {held.get('pid')} on "
                            f"{held.get('host')}, since {since}); wait for it to finish, stop it, or pick "
                            "another name=...")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            held = self._read()
            if held and held.get("token") != self.record["token"]:
                log.error("the lease of %s was taken over by pid %s on %s; this driver no longer owns the run",
                          self.location, held.get("pid"), held.get("host"))
                return
            self._write()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("token") == self.record["token"]:
            storage.delete(self.url)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_lease(cfg) -> RunLease:
    """The lease of an ``ExperimentConfig``'s run folder: in its bucket when ``run_root`` is a URL, else local."""
    return RunLease(cfg.run_url or Path(cfg.run_dir).resolve())
