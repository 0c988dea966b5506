"""Named phases where a test or a stress run can hold this process back (stdlib only: client and server use it).

`NEURON_CACHE_TEST_PAUSE=<phase>:<folder>`: the first time the process reaches `<phase>` it creates
`<folder>/<phase>.<pid>.reached` and waits (at most 300 s) until `<folder>/<phase>.go` exists.
`NEURON_CACHE_TEST_DELAY=<phase>:<seconds>[,...]`: at every arrival it sleeps a random time of up to `<seconds>`.
Unset, `reached` is two dictionary lookups. For tests and `python -m stress.leases` only; PHASES lists the phases.
"""

from __future__ import annotations

import os
import random
import threading
import time

ENV_PAUSE = "NEURON_CACHE_TEST_PAUSE"
ENV_DELAY = "NEURON_CACHE_TEST_DELAY"

PHASES = {
    "lease-look": "a host decided to take (or take over) a lease on what a probe showed, and has not asked yet",
    "lease-write": "a bucket server looked at a lease (nobody holds it, or the holder judged gone) and has not "
                   "written anything yet",
}
_MAX_PAUSE = 300.0
_paused: set[str] = set()
_lock = threading.Lock()


def _spec(name: str, phase: str) -> str | None:
    """The argument `name` gives `phase` (it may name several: `<phase>:<argument>,...`), or None."""
    value = os.environ.get(name)
    for spec in value.split(",") if value else ():
        named, _, arg = spec.partition(":")
        if named not in PHASES or not arg:
            raise ValueError(f"{name}={value!r}: use <phase>:<argument>[,...] with phases among {', '.join(PHASES)}")
        if named == phase:
            return arg
    return None


def reached(phase: str) -> None:
    """Hold this process back here if a test asked for it (see the module docstring)."""
    delay = _spec(ENV_DELAY, phase)
    if delay is not None:
        time.sleep(random.uniform(0.0, float(delay)))
    folder = _spec(ENV_PAUSE, phase)
    if folder is None:
        return
    with _lock:
        if phase in _paused:
            return
        _paused.add(phase)
    with open(os.path.join(folder, f"{phase}.{os.getpid()}.reached"), "w", encoding="utf-8"):
        pass
    deadline = time.monotonic() + _MAX_PAUSE
    while not os.path.exists(os.path.join(folder, f"{phase}.go")) and time.monotonic() < deadline:
        time.sleep(0.01)
