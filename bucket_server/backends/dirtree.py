"""File operations below a directory bucket's root that never follow a symlink.

A directory bucket is a tree that anyone on the team can write, so every name in it is hostile. Each path
is walked one component at a time from its parent's descriptor (`openat` with `O_NOFOLLOW`), and files are
opened, renamed, linked and removed relative to the descriptor of their folder. A symlink met anywhere is
refused, and one swapped in during an operation cannot redirect it: checking a path, then opening it by
name, is not enough. The bucket root itself is the user's own path, and is opened normally.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: opening a FIFO planted in the bucket must not hang the server (it is then refused by fstat).
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Deeper than any layout path (6 levels): a deeper tree is not walked further.
MAX_DEPTH = 32
MAX_PATH = 1024


class Refused(Exception):
    """A component of a bucket path is a symlink, or not the kind of thing expected there."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} {what}")
        self.path = path
        self.what = what


def open_root(root: str) -> int:
    """The bucket root's descriptor (FileNotFoundError or NotADirectoryError when it is not a folder)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir(parent: int, name: str, *, shown: str, create: bool = False) -> int:
    """The folder `name` in `parent`, made first when `create` (mode from the umask). FileNotFoundError
    when missing; Refused when it is a symlink or not a folder."""
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
        except FileExistsError:
            pass
        except FileNotFoundError:  # `parent` itself was removed or replaced meanwhile: someone is tampering
            raise Refused(shown, "changed while it was being written: refused") from None
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(shown, "is a symlink or not a folder: refused") from None
        if create and exc.errno == errno.ENOENT:  # made a moment ago, gone now: someone is tampering
            raise Refused(shown, "changed while it was being written: refused") from None
        raise


def open_file(parent: int, name: str, *, shown: str) -> int:
    """A regular file of `parent`, for reading. FileNotFoundError when missing; Refused when it is a symlink
    or anything but a regular file."""
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(shown, "is a symlink: refused") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(shown, "is not a regular file: refused")
    return fd


def create_file(parent: int, name: str) -> int:
    """A new file in `parent`, for writing; never an existing one, never through a symlink."""
    return os.open(name, NEW_FILE_FLAGS, 0o666, dir_fd=parent)


def lstat(parent: int, name: str) -> os.stat_result | None:
    """The status of `name` in `parent`, not following a symlink; None when missing."""
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_small(parent: int | None, name: str, limit: int) -> bytes | None:
    """Up to `limit` bytes of a small regular file; None when it (or its folder) is missing, b"" when it is
    there but not a regular file (a symlink, a folder) or cannot be read."""
    if parent is None:
        return None
    try:
        fd = open_file(parent, name, shown=name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (Refused, OSError):
        return b""
    try:
        return os.read(fd, limit)
    except OSError:
        return b""
    finally:
        os.close(fd)


def unlink(parent: int, name: str) -> None:
    """Remove a file (a symlink itself, never its target); a missing one is fine."""
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


def remove(parent: int, name: str, depth: int = 0) -> None:
    """Remove whatever `name` is in `parent`: a file, a symlink (never its target), or a folder with all it
    holds, walked by descriptors (a folder deeper than MAX_DEPTH is left). A missing one is fine."""
    info = lstat(parent, name)
    if info is None or not stat.S_ISDIR(info.st_mode):
        unlink(parent, name)
        return
    if depth >= MAX_DEPTH:
        return
    try:
        fd = open_dir(parent, name, shown=name)
    except (OSError, Refused):  # gone, or swapped for something else meanwhile
        return
    try:
        for entry in os.listdir(fd):
            remove(fd, entry, depth + 1)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent)
    except OSError:
        pass


def safe_name(name: str) -> bool:
    """A name a remote path may hold: valid UTF-8 (Python shows other bytes as surrogate escapes, which no
    JSON frame can carry), no backslash, no control character."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and "\\" not in name and all(ord(c) >= 0x20 and c != "\x7f" for c in name)


def shown(path: str) -> str:
    """A bucket path for a log line or a message, whatever bytes its names hold."""
    return ascii(path)[1:-1]


#: (bucket path, lstat of the file, descriptor of the same folder under the shadow tree, or None)
Found = tuple[str, os.stat_result, "int | None"]


def walk_files(top: int, prefix: str, *, skipped: list[str], hidden: Sequence[str] = (), shadow: int | None = None,
               depth: int = 0, with_dirs: Callable[[str], None] | None = None,
               keep: Callable[[str], bool] | None = None) -> Iterator[Found]:
    """The regular files under the folder `top` (bucket path `prefix`), sorted, each with the descriptor of
    its folder's twin under `shadow` (the sidecar tree), when there is one.

    Never follows a symlink: folders are opened with O_NOFOLLOW from their parent's descriptor, symlinks
    and special files are left out. (os.fwalk would open a symlink's target before refusing it.) Names that
    are not safe_name, paths too long or too deep are left out and appended to `skipped`. `hidden` names
    are left out at this level. with_dirs, if given, is called with each subfolder and nothing is walked
    below it (a one-level listing). A path that `keep` accepts is yielded whatever it is (a symlink, a FIFO,
    a folder: never opened nor walked)."""
    try:
        entries = sorted(os.scandir(top), key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name in hidden:
            continue
        path = f"{prefix}/{name}" if prefix else name
        if not safe_name(name) or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
            skipped.append(path)
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) or (keep is not None and keep(path)):
            yield path, info, shadow
        elif stat.S_ISDIR(info.st_mode):
            if with_dirs is not None:
                with_dirs(path)
                continue
            if depth + 1 >= MAX_DEPTH:
                skipped.append(f"{path}/ (over {MAX_DEPTH} levels deep)")
                continue
            try:
                child = open_dir(top, name, shown=path)
            except (OSError, Refused):  # gone or swapped for a symlink since the listing: left out
                continue
            child_shadow = None
            if shadow is not None:
                try:
                    child_shadow = open_dir(shadow, name, shown=path)
                except (OSError, Refused):
                    pass
            try:
                yield from walk_files(child, path, skipped=skipped, shadow=child_shadow, depth=depth + 1, keep=keep)
            finally:
                os.close(child)
                if child_shadow is not None:
                    os.close(child_shadow)


class Dirs:
    """Descriptors of folders under the bucket root, opened once per operation, each component with
    O_NOFOLLOW from its parent's descriptor, and closed at its end (a context manager)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: dict[tuple[str, ...], int] = {(): root_fd}

    def get(self, parts: Sequence[str], *, create: bool = False) -> int:
        """The folder at `parts`; FileNotFoundError when missing (unless `create`), Refused when a
        component is a symlink or not a folder."""
        key = tuple(parts)
        fd = self._fds.get(key)
        if fd is None:
            parent = self.get(key[:-1], create=create)
            fd = open_dir(parent, key[-1], shown="/".join(key), create=create)
            self._fds[key] = fd
        return fd

    def find(self, parts: Sequence[str]) -> int | None:
        """The folder at `parts`, or None when it is missing or refused."""
        try:
            return self.get(parts)
        except (OSError, Refused):
            return None

    def close(self) -> None:
        """Close every descriptor opened for the operation."""
        for key, fd in self._fds.items():
            if key:
                os.close(fd)
        self._fds = {(): self.root_fd}
        os.close(self.root_fd)

    def __enter__(self) -> "Dirs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
