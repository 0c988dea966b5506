"""`NeuronCacheCallback`: the bucket cache in a `transformers.Trainer` (or optimum-neuron's `NeuronTrainer`).

    from optimum_neuron_cache.integrations.trainer import NeuronCacheCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[NeuronCacheCallback("meta-llama/Llama-3.2-1B", export_config={"sequence_length": 2048})])
    trainer.train()

- `on_train_begin`: local rank 0 fetches the model's entries; the host's other ranks wait for it (bounded).
- `on_save`: the publisher publishes what was compiled so far, in the background.
- `on_train_end`: the publisher publishes the rest and writes the export record.

Ranks and guarantees are those of `TrainingCacheSession` (see session.py). The export config is derived
from the training arguments (batch size, gradient accumulation, dtype, world size, and the tensor/pipeline
parallel sizes of optimum-neuron's `NeuronTrainingArguments`), then updated with `export_config`. The model
id defaults to the model's `name_or_path` (a Hub id or a local directory); a model built from a config has
none, and then only the flat area is used.

`transformers` is an optional dependency (`pip install "optimum-neuron-cache[trainer]"`). Without it this
module still imports and the callback can be driven by hand, but there is no Trainer to call it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from .. import remote_layout as layout
from ..buckets import BucketRef, resolve_bucket
from ..errors import ConfigurationError
from ..neuron_sdk import resolve_compiler_version
from .ranks import RankInfo
from .session import SessionReport, TrainingCacheSession

log = logging.getLogger("optimum_neuron_cache")

try:  # optional: the callback must subclass TrainerCallback for Trainer's CallbackHandler, when it exists
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # ImportError, or a broken transformers install: never break `import` of this module
    _CallbackBase = object  # type: ignore[misc,assignment]


def export_config_from_args(args: Any) -> dict[str, Any]:
    """What of the training arguments shapes the compiled graphs."""
    config: dict[str, Any] = {}
    for key, attribute in (("batch_size", "per_device_train_batch_size"),
                           ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                           ("world_size", "world_size"),
                           ("tensor_parallel_size", "tensor_parallel_size"),
                           ("pipeline_parallel_size", "pipeline_parallel_size")):
        try:
            value = getattr(args, attribute, None)
        except Exception:  # properties of TrainingArguments may touch torch.distributed
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = value
    if getattr(args, "bf16", False):
        config["dtype"] = "bf16"
    elif getattr(args, "fp16", False):
        config["dtype"] = "fp16"
    else:
        config["dtype"] = "fp32"
    return config


def model_id_from_model(model: Any) -> str | None:
    """A model's Hub id or local directory (`name_or_path`), when it names something the cache can key."""
    candidates = [getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)]
    for candidate in candidates:
        if isinstance(candidate, (str, os.PathLike)) and os.fspath(candidate):
            try:
                layout.model_ref(candidate)
            except ConfigurationError:
                continue
            return os.fspath(candidate)
    return None


class NeuronCacheCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """Fetch before the first step, publish at checkpoints and at the end; rank-aware and best effort.

    model_id: default the trained model's `name_or_path`. task: default "training" (training graphs differ
    from inference graphs). export_config: merged over what the training arguments say. publish: "host"
    (local rank 0 of each host publishes that host's compiles) or "world" (global rank 0 only, for a cache
    dir shared by all hosts). wait_timeout: the longest a rank waits for its host's fetch (default
    NEURON_CACHE_LOCK_TIMEOUT). sync_on_save: publish at each checkpoint (in the background).
    """

    def __init__(self, model_id: str | os.PathLike[str] | None = None, task: str | None = "training",
                 export_config: Mapping[str, Any] | None = None, *, bucket: str | BucketRef | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, compiler_version: str | None = None,
                 publish: Literal["host", "world"] = "host", sync_on_save: bool = True,
                 wait_timeout: float | None = None, ranks: RankInfo | None = None) -> None:
        # Validate now, when the Trainer is built: bad input raises before any training.
        if model_id is not None:
            layout.model_ref(model_id)
        layout.task_name(task)
        resolve_bucket(bucket)
        compiler_version = resolve_compiler_version(compiler_version)
        if publish not in ("host", "world"):
            raise ValueError(f"publish must be 'host' or 'world', not {publish!r}")
        self.model_id = model_id
        self.task = task
        self.export_config = dict(export_config) if export_config is not None else None
        self.bucket = bucket
        self.cache_dir = cache_dir
        self.compiler_version = compiler_version
        self.publish = publish
        self.sync_on_save = sync_on_save
        self.wait_timeout = wait_timeout
        self.ranks = ranks
        self.session: TrainingCacheSession | None = None

    @property
    def report(self) -> SessionReport | None:
        """What this process did (None before training began)."""
        return self.session.report if self.session else None

    # Trainer calls these with (args, state, control, **kwargs); each one is best effort.
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Local rank 0 fetches; the host's other ranks wait for it (bounded). Never raises."""
        if self.session is not None:  # a second train() call on the same callback: start a new session
            self._end(None)
        model_id = self.model_id if self.model_id is not None else model_id_from_model(model)
        config = {**export_config_from_args(args), **(self.export_config or {})}
        self.session = TrainingCacheSession(
            model_id, self.task, config, bucket=self.bucket, cache_dir=self.cache_dir,
            compiler_version=self.compiler_version, ranks=self.ranks or _ranks_from(args), publish=self.publish,
            wait_timeout=self.wait_timeout,
        )
        try:
            self.session.begin()
        except Exception as exc:  # our bug must never stop training
            log.warning("optimum-neuron-cache: fetch before training failed unexpectedly: %s: %s", type(exc).__name__, exc)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The publisher publishes what was compiled so far, in the background. Never raises."""
        if self.session is None or not self.sync_on_save:
            return
        try:
            self.session.checkpoint()
        except Exception as exc:
            log.warning("optimum-neuron-cache: checkpoint publication failed unexpectedly: %s: %s", type(exc).__name__, exc)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The publisher publishes the rest and writes the export record. Never raises."""
        self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        if self.session is None:
            return
        try:
            self.session.end(exc)
        except Exception as error:
            log.warning("optimum-neuron-cache: final publication failed unexpectedly: %s: %s", type(error).__name__, error)


def _ranks_from(args: Any) -> RankInfo:
    """Ranks from the environment (torchrun); else from the training arguments (accelerate, notebooks)."""
    env = RankInfo.from_env()
    if any(name in os.environ for name in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK")):
        return env
    try:
        return RankInfo(rank=int(getattr(args, "process_index", 0)), local_rank=int(getattr(args, "local_process_index", 0)),
                        world_size=int(getattr(args, "world_size", 1)), local_world_size=env.local_world_size)
    except Exception:
        return env
