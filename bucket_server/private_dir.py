"""The two checks both ends of the socket make, in one place: a private directory opened without following a
symlink, and the uid of the peer. Standard library only: the client (any environment) imports this module too.
"""

from __future__ import annotations

import os
import socket
import stat
import struct


class UnsafeRuntimeDir(PermissionError):
    """The socket's directory is a symlink, not ours, or open to others: nobody binds or connects there."""


def open_private_dir(path: str | os.PathLike[str]) -> int:
    """Open a directory without following a symlink, and check owner (us) and mode (no group or other bits) on
    the descriptor: everything inside is then reached through it, so a name swapped later redirects nothing.
    Raises UnsafeRuntimeDir with one line naming the path and what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        what = "is a symlink" if os.path.islink(path) else f"is not a directory we can open ({exc.strerror})"
        raise UnsafeRuntimeDir(f"the runtime directory {os.fspath(path)} {what}") from None
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        os.close(fd)
        raise UnsafeRuntimeDir(f"the runtime directory {os.fspath(path)} must belong to uid {os.getuid()} with mode 0700 "
                               f"(it has uid {info.st_uid}, mode {oct(stat.S_IMODE(info.st_mode))})")
    return fd


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux SO_PEERCRED); None where the platform cannot tell."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
