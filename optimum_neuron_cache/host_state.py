"""What this project keeps inside the cache root, beside libneuronxla's folders (under `.optimum-neuron-cache/`).

- `locks/`: per-entry file locks, node-wide. They are flock locks (filelock), released by the kernel when
  their holder dies, so a killed process never blocks anyone: liveness, not age. `locks/fetch-<key>` is the
  host-wide gate of fetching one model area (fetch.HostFetchGate), which also holds its last fetch's note.
- `tmp/<host>.<pid>.<random>/`: downloads in progress, on the cache's filesystem so an entry is renamed into place
  whole. Left over by a killed process, they are removed by the next run.
- `journal/`: the write-ahead journal of publications (journal.py).
- `published/`: when this host last published each entry destination, so that ranks exiting together
  publish each entry once even when one plans before another finishes.

Two more folders live there, kept by their own modules: `sessions/` (training sessions' fetch status,
integrations/session.py) and `shim/` (the compiler shim's memo and "bucket is down" note).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pwd
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from filelock import Timeout

from .atomic import STATE_OPEN_FLAGS, atomic_write
from .local_cache import STATE_DIR_NAME, version_dir_name
from .processes import alive

log = logging.getLogger("optimum_neuron_cache")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def foreign_state(root: Path) -> str | None:
    """Why this user cannot keep this package's state in the cache root `root`, in one line saying what happens
    and what to do; None when it can. The state folder is one user's (docs/reliability.md, "The local journal
    and state folder are hostile input"): it must be this user's, or not exist yet in a root this user can
    write."""
    state, me = root / STATE_DIR_NAME, os.geteuid()
    try:
        info = os.stat(state)  # a state folder symlinked to one of this user's folders is this user's
    except FileNotFoundError:
        try:
            if os.access(root, os.W_OK | os.X_OK, effective_ids=True):
                return None
            whose = f"{root} belongs to {_user(os.stat(root).st_uid)} and is not writable by you ({_user(me)})"
        except FileNotFoundError:  # no root yet: this run makes it, as this user's
            return None
    else:
        if stat.S_ISDIR(info.st_mode) and info.st_uid == me:
            return None
        what = "belongs to" if stat.S_ISDIR(info.st_mode) else "is not a folder; it belongs to"
        whose = f"its state folder {state} {what} {_user(info.st_uid)}, not to you ({_user(me)})"
    return (f"the compile cache root {root} is another user's: {whose}. This run neither fetches nor publishes, and "
            f"what it compiles there is published only by that user (`neuron-cache sync --cache-dir {root}`). "
            "Use a cache root of your own (NEURON_COMPILE_CACHE_URL, or cache_dir=) to sync your compiles")


class HostState:
    """This package's bookkeeping in a cache root (`.optimum-neuron-cache/`): locks, temp folders, publication
    markers."""
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / STATE_DIR_NAME
        self._lock_folders: set[Path] = set()

    # ---------------------------------------------------------------------------------- locks
    def entry_lock(self, compiler_version: str, module: str, purpose: str) -> EntryLock:
        """The node-wide lock of one entry for `purpose` ("fetch" or "publish")."""
        folder = self.base / "locks" / version_dir_name(compiler_version)
        if folder not in self._lock_folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock_folders.add(folder)
        return EntryLock(folder / f"{module}.{purpose}.lock")

    def fetch_gate_path(self, key: str) -> Path:
        """The host-wide gate of fetching what `key` names (bucket, compiler version, model area): a lock file
        whose holder fetches while the others wait, and which then holds what the fetch found."""
        folder = self.base / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"fetch-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    # ------------------------------------------------------------------------------ publications
    def _published_marker(self, bucket: str, destination: str) -> Path:
        key = hashlib.sha256(f"{bucket}\0{destination}".encode()).hexdigest()[:32]
        return self.base / "published" / key

    def mark_published(self, bucket: str, destinations: list[str]) -> None:
        """Note that this host just published these entry destinations (bucket folders)."""
        for destination in destinations:
            marker = self._published_marker(bucket, destination)
            try:
                if stat.S_ISREG(os.lstat(marker).st_mode):
                    os.utime(marker, follow_symlinks=False)
                    continue
                log.warning("optimum-neuron-cache: replacing %s: not a regular file (a publication marker)", marker)
            except FileNotFoundError:
                marker.parent.mkdir(parents=True, exist_ok=True)
            try:
                atomic_write(marker, b"")  # a symlink or a FIFO there is replaced, never followed or opened
            except IsADirectoryError:  # a folder is not ours to remove: that entry's marker is lost, nothing else
                log.warning("optimum-neuron-cache: cannot mark %s published: %s is a folder", destination, marker)

    def published_since(self, bucket: str, destination: str, since: float) -> bool:
        """Whether a process of this host published `destination` after `since` (a time.time() value).
        Only a recent publication counts: the bucket itself stays the truth for anything older."""
        try:
            info = os.lstat(self._published_marker(bucket, destination))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_mtime >= since  # a symlink's target's time says nothing

    # ------------------------------------------------------------------------------- temp dirs
    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A private folder on the cache's filesystem, removed on exit whatever happens."""
        path = self.base / "tmp" / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def remove_stale_temp_dirs(self) -> int:
        """Remove this host's temp folders whose owning process is gone (killed mid-download).

        Folders of other hosts (a cache root on a shared filesystem) are left alone: their pids mean nothing here.
        """
        removed = 0
        try:
            items = list((self.base / "tmp").iterdir())
        except FileNotFoundError:
            return 0
        for item in items:
            if self.is_stale_temp_dir(item):
                shutil.rmtree(item, ignore_errors=True)
                removed += 1
        return removed

    @staticmethod
    def is_stale_temp_dir(path: Path) -> bool:
        """A temp folder of this host whose process is gone."""
        owner, _, pid = path.name.rpartition(".")[0].rpartition(".")
        return owner == socket.gethostname() and pid.isdigit() and not alive(int(pid))


class EntryLock:
    """A flock on one lock file, as filelock's FileLock takes it on Unix (the two exclude each other), for the
    16 or more entries a fetch or a publish locks at once: about 20 microseconds each instead of 250.
    `acquire` raises filelock's Timeout, like FileLock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    @property
    def lock_file(self) -> str:
        """The lock file's path (as FileLock names it)."""
        return str(self.path)

    def acquire(self, timeout: float = -1, poll_interval: float = 0.05) -> None:
        """Take the lock, polling until `timeout` seconds have passed (0: one try; negative: no limit)."""
        if self._fd is not None:
            return
        deadline = None if timeout < 0 else time.monotonic() + timeout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | STATE_OPEN_FLAGS, 0o644)  # only flocked, never read
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Timeout(str(self.path)) from None
                    time.sleep(poll_interval)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let go (closing the file releases the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
