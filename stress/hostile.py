"""A team that shares one host and one directory bucket, at stress counts (CI runs the same with small ones).

- `connect_storm`: N processes of this host start at the same instant and each asks the bucket server for the
  bucket's info: the listen backlog overflows (EAGAIN) and every one of them must still get its answer.
- `symlink_flips`: while one thread flips a model folder of a directory bucket between a real folder and a
  symlink to a directory outside the bucket, writes and listings run: no write may land outside, no listing
  may show what is outside.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from bucket_server.backends import BackendError
from bucket_server.backends.dir import DirBackend
from bucket_server.messages import AddFile
from optimum_neuron_cache.buckets import parse_bucket
from optimum_neuron_cache.client import BucketClient
from stress.scenarios import Figures, _env

#: One rank of the storm: wait for the start file, then one request through a fresh process's client.
_RANK = """
import os, sys, time
from optimum_neuron_cache.buckets import parse_bucket
from optimum_neuron_cache.client import BucketClient
start = sys.argv[2]
open(f"{start}.ready.{os.getpid()}", "w").close()
while not os.path.exists(start):
    time.sleep(0.001)
BucketClient(parse_bucket(sys.argv[1])).info()
"""


def connect_storm(workdir: Path, bucket: str, processes: int) -> Figures:
    """`processes` clients start at once against one server; each must get its answer."""
    figures = Figures(f"{processes} processes connecting at once", trials=processes)
    workdir.mkdir(parents=True, exist_ok=True)
    start = workdir / "start"
    BucketClient(parse_bucket(bucket)).info()  # the server is up before the storm: the storm is about connects
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, bucket, str(start)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    deadline = time.monotonic() + 600
    while len(list(workdir.glob("start.ready.*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.01)  # every rank has imported everything: they connect at the same instant
    start.touch()
    for rank in ranks:
        _, err = rank.communicate(timeout=600)
        if rank.returncode != 0:
            figures.fail(f"a rank failed: {err.strip().splitlines()[-1:]}")
    return figures


def symlink_flips(workdir: Path, operations: int) -> Figures:
    """`operations` writes and listings of a directory bucket while a model folder is flipped to a symlink."""
    figures = Figures(f"{operations} writes and listings under symlink flips", trials=operations)
    root, outside = workdir / "bucket", workdir / "outside"
    (outside / "MODULE_1+a").mkdir(parents=True)
    (outside / "MODULE_1+a" / "planted.neff").write_text("from outside")
    folder = root / "v" / "models" / "org--m"
    folder.mkdir(parents=True)
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        away = folder.with_name("away")
        while not stop.is_set():
            for step in (lambda: folder.rename(away), lambda: folder.symlink_to(outside), folder.unlink,
                         lambda: away.rename(folder)):
                try:
                    step()
                except OSError:
                    pass
            flips[0] += 1

    backend = DirBackend(str(root))
    logging.getLogger("bucket_server").setLevel(logging.ERROR)  # each refusal is logged: expected here, by the thousand
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        for index in range(operations):
            try:
                backend.batch(add=[AddFile(f"v/models/org--m/MODULE_{index}+a/model.neff", content="x")],
                              copy=[], delete=[])
            except BackendError:
                pass  # refused: the folder was a symlink, or changed under the write
            listed = backend.list("v", recursive=True) + backend.list("v/models/org--m", recursive=True)
            if any("planted" in item.path for item in listed):
                figures.fail(f"operation {index}: a listing showed a file from outside the bucket")
    finally:
        stop.set()
        flipper.join()
    outside_files = sorted(str(path.relative_to(outside)) for path in outside.rglob("*") if path.is_file())
    if outside_files != ["MODULE_1+a/planted.neff"]:
        figures.fail(f"writes landed outside the bucket: {outside_files[:5]}")
    if flips[0] == 0:
        figures.fail("the folder was never flipped: the operations proved nothing")
    figures.notes.append(f"{flips[0]} flips")
    return figures
