"""Which process this is in a distributed job, from the variables torchrun (and Neuron's launchers) set.

LOCAL_RANK / RANK / WORLD_SIZE / LOCAL_WORLD_SIZE come from torchrun, torch.distributed.launch, accelerate and
`neuron_parallel_compile` (which runs torchrun); without them the process is alone: rank 0 of 1. MPI
launchers' OMPI_COMM_WORLD_* variables are read as a fallback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

_IMPORTED_AT = time.time()


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return default


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a distributed job."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankInfo:
        """Ranks from torchrun's variables (MPI's as a fallback); alone when none is set."""
        env = os.environ if environ is None else environ
        world = _int(env, "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", default=1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", default=world)
        return cls(
            rank=_int(env, "RANK", "OMPI_COMM_WORLD_RANK", default=0),
            local_rank=_int(env, "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            world_size=world,
            local_world_size=local_world,
        )

    @property
    def is_host_main(self) -> bool:
        """The one process of this host that talks to the bucket."""
        return self.local_rank == 0

    def is_publisher(self, publish: Literal["host", "world"]) -> bool:
        """`host`: one publisher per host (local caches: each host compiled its own graphs, e.g. pipeline
        stages); `world`: only global rank 0 (one cache dir shared by every host, FSx/EFS)."""
        return self.rank == 0 if publish == "world" else self.local_rank == 0


def process_start_time() -> float:
    """When this process started (wall clock), from /proc on Linux; else when this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of the whole line: starttime, in clock ticks after boot
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT
