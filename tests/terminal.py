"""Running a command on a pseudo-terminal, as a person at a terminal would: what it showed, and its exit code."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
from collections.abc import Mapping, Sequence


def on_terminal(command: Sequence[str], env: Mapping[str, str], *, answer: bytes | None = None,
                timeout: float = 120.0) -> tuple[int, str]:
    """Run `command` with stdin, stdout and stderr a terminal of 40x120 (a pty starts with no size); type
    `answer` at its first `[y/N]` question. Returns (exit code, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execve(command[0], list(command), dict(env))
    output, answered = b"", answer is None
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if ready else b""
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if not answered and b"[y/N]" in output:
            os.write(fd, answer or b"")
            answered = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")
