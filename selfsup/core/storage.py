"""Object storage (``s3://``, ``gs://``) for shards, checkpoints and run state, through pyarrow's filesystems.

Credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS`` …), never from the config.

A run whose ``run_root`` is a URL works in a local mirror (``selfsup.config.mirror_dir``: under
``$SELFSUP_CACHE``, default ``~/.cache/selfsup``) and pushes to the bucket: each checkpoint's files first, its
``progress.json`` (which lists the others with their sizes and digests) last, so a reader never takes
a half-written checkpoint; the run's small files
(``metrics.jsonl``, ``summary.json``, ``wandb_id``) after them. A restarted run, on any node,
pulls the complete checkpoint written last back (``selfsup.core.checkpoint.decide_resume``). (Under Ray,
Ray's checkpoint storage uploads the checkpoints instead; this mirror serves ``--no-ray`` runs on a bucket.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from selfsup.errors import OneLineError

PROGRESS = "progress.json"  # the checkpoint file written last (selfsup.core.checkpoint)
RUN_FILES = ("wandb_id", "metrics.jsonl", "summary.json")
SCHEMES = ("s3://", "gs://")


class FolderNotWritable(OneLineError, RuntimeError):
    """A folder a command must write in cannot be written; the message names it and what to do."""


def require_writable(folder: str | Path, why: str) -> None:
    """Create ``folder`` if missing, then create and remove a file in it: the write itself, so that a
    read-only mount, a path under a file or missing permissions are found before any work, and a
    folder root may write in passes. Raises FolderNotWritable naming it and ``why`` (what writes there,
    what to do)."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".selfsup-write-probe-", dir=folder)
    except OSError as err:
        raise FolderNotWritable(f"{folder} is not writable ({err.strerror or err}); {why}") from None
    os.close(fd)
    os.unlink(probe)


def is_remote(location: str | os.PathLike | None) -> bool:
    """True for an object-storage URL this module handles (s3://, gs://)."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def _fs(url: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(url)
    except Exception as err:  # missing credentials, unknown bucket region, bad URL
        raise OSError(
            f"{url}: cannot open the object store ({type(err).__name__}: {err}); check the URL "
            "and the AWS_*/GOOGLE_* environment (AWS_ENDPOINT_URL for a non-AWS S3 server)"
        ) from None


def open_read(url: str):
    """A binary reader of ``url``: object-store URLs through pyarrow, the rest through webdataset's gopen."""
    if not is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    fs, path = _fs(url)
    try:
        return fs.open_input_stream(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        if "does not exist" in str(err) or "NoSuchKey" in str(err):
            raise FileNotFoundError(url) from None
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to the object ``url``."""
    fs, path = _fs(url)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(url: str) -> None:
    """Remove the file at ``url`` (a path or an object-store URL); a missing one is fine."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    fs, path = _fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def _upload(local: Path, url: str) -> None:
    fs, path = _fs(url)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _download(url: str, local: Path) -> None:
    fs, path = _fs(url)
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _children(url: str) -> list[str]:
    """Names directly under the prefix ``url`` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    return sorted(i.base_name for i in infos)


def _sizes(url: str) -> dict[str, int]:
    """Name -> size of the files directly under the prefix ``url``."""
    import pyarrow.fs as pafs

    fs, path = _fs(url)
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _remote_progress(url: str) -> dict:
    """The ``progress.json`` of the checkpoint at ``url`` if it is complete, else {}."""
    sizes = _sizes(url)
    if PROGRESS not in sizes:
        return {}
    try:
        with open_read(f"{url}/{PROGRESS}") as f:
            progress = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    files = progress.get("files") or {}
    return progress if files and all(sizes.get(n) == s for n, s in files.items()) else {}


def remote_checkpoints(run_url: str) -> list[str]:
    """Names of the complete checkpoints under ``<run_url>/checkpoints``, in the order written."""
    root = f"{run_url}/checkpoints"
    found = {n: _remote_progress(f"{root}/{n}") for n in _children(root)}
    return sorted((n for n, p in found.items() if p), key=lambda n: found[n]["seq"])


def checkpoint_names(run_url: str) -> list[str]:
    """Names under ``<run_url>/checkpoints``, complete checkpoints or not."""
    return _children(f"{run_url}/checkpoints")


def delete_checkpoint(run_url: str, name: str) -> None:
    """Remove the checkpoint ``name`` of the run at ``run_url`` (every file of it)."""
    fs, path = _fs(f"{run_url}/checkpoints/{name}")
    fs.delete_dir(path)


def push_checkpoint(local: Path, run_url: str, keep: int) -> str:
    """Upload the checkpoint dir ``local`` (``progress.json`` last) and delete all but the ``keep`` written last."""
    root = f"{run_url}/checkpoints"
    url = f"{root}/{local.name}"
    fs, path = _fs(url)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # a re-written checkpoint: drop its progress.json first
    for f in sorted(local.iterdir(), key=lambda f: f.name == PROGRESS):
        _upload(f, f"{url}/{f.name}")
    for old in remote_checkpoints(run_url)[:-keep]:
        fs.delete_dir(_fs(f"{root}/{old}")[1])
    return url


def pull_checkpoint(run_url: str, name: str, local_run_dir: Path) -> Path:
    """Download the remote checkpoint ``name`` into ``<local_run_dir>/checkpoints`` unless it is there."""
    dest = Path(local_run_dir) / "checkpoints" / name
    if (dest / PROGRESS).is_file():
        return dest
    tmp = dest.parent / f".tmp-pull-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(_children(f"{run_url}/checkpoints/{name}"), key=lambda f: f == PROGRESS):
        _download(f"{run_url}/checkpoints/{name}/{f}", tmp / f)
    try:
        os.replace(tmp, dest)
    except OSError:  # another rank on this node pulled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def move_aside(run_url: str, name: str) -> str:
    """Move the remote checkpoint ``name`` to ``<run_url>/corrupt/<name>`` (kept for inspection): its
    ``progress.json`` goes first, so that it stops counting as a checkpoint at once. Returns the new URL."""
    src, dest = f"{run_url}/checkpoints/{name}", f"{run_url}/corrupt/{name}"
    fs, path = _fs(src)
    for f in sorted(_children(src), key=lambda f: f != PROGRESS):
        fs.copy_file(f"{path}/{f}", f"{_fs(dest)[1]}/{f}")
        fs.delete_file(f"{path}/{f}")
    return dest


def push_run_files(local_run_dir: Path, run_url: str) -> None:
    """Upload the run's small files (metrics, summary, W&B id) that exist locally."""
    for name in RUN_FILES:
        if (Path(local_run_dir) / name).is_file():
            _upload(Path(local_run_dir) / name, f"{run_url}/{name}")


def pull_run_files(run_url: str, local_run_dir: Path) -> None:
    """Download the run's small files (so a resumed run keeps its W&B id and metrics); the bucket's
    copy replaces one here, which may be stale (rank 0 of a later attempt ran on another node)."""
    present = set(_children(run_url))
    Path(local_run_dir).mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if name in present:
            tmp = Path(local_run_dir) / f".{name}.pull-{os.getpid()}"
            _download(f"{run_url}/{name}", tmp)
            os.replace(tmp, Path(local_run_dir) / name)
