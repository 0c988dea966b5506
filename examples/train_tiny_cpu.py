"""A `transformers.Trainer` run with the bucket cache, on CPU, with a tiny model: no account, no Neuron hardware.

    pip install "optimum-neuron-cache[trainer]" torch      # any torch; the CPU build is enough
    python examples/train_tiny_cpu.py                      # run it twice: the second run hits

On Trainium, torch-xla compiles each new graph of the training step with neuronx-cc, through libneuronxla's
compile cache. On CPU there is no such compile, so this example stands one in: a small callback "compiles"
a new graph at each of the first steps (and an evaluation graph at the end) with the simulated compiler,
into the same compile cache, exactly as libneuronxla lays entries out.

`NeuronCacheCallback` then does what it does on Trainium:
- before the first step, local rank 0 fetches the model's entries from the bucket (the other ranks wait);
- at each checkpoint, the graphs compiled so far are published, in the background;
- at the end, the rest is published with an export record.

The model is saved to a local directory and loaded from it, so the cache keys it by content
(`models/local--tiny-gpt2-<hash of config.json>/training/`), the same on every machine. The bucket is
NEURON_CACHE_BUCKET or the embedded default directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from optimum_neuron_cache.integrations.trainer import NeuronCacheCallback
from optimum_neuron_cache.local_cache import resolve_cache_root
from optimum_neuron_cache.testing.simulated_compiler import compile_graph, make_graphs

COMPILER_VERSION = os.environ.get("NEURON_CC_VERSION") or "2.21.33363.0+82129205"
NEW_GRAPH_STEPS = (1, 2, 3)  # steps whose graph is new (on Trainium: the first steps, until shapes settle)


class SimulatedXlaCompiles(TrainerCallback):
    """Stands in for torch-xla + libneuronxla: one graph per new step shape, compiled into the cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.graphs = make_graphs(len(NEW_GRAPH_STEPS) + 1, seed="tiny-gpt2-training")
        self.compiled_at_steps: list[int] = []
        self.hits = 0

    def _compile(self, index: int, step: int | None) -> None:
        result = compile_graph(self.cache_dir, COMPILER_VERSION, self.graphs[index], seconds=0.2)
        if result.hit:
            self.hits += 1
        elif step is not None:
            self.compiled_at_steps.append(step)

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if step in NEW_GRAPH_STEPS:
            self._compile(NEW_GRAPH_STEPS.index(step), step)

    def on_train_end(self, args, state, control, **kwargs):
        self._compile(len(NEW_GRAPH_STEPS), None)  # an evaluation graph, after the last checkpoint


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: a temp dir)")
    parser.add_argument("--cache-dir", default=None, help="the compile cache (default: a fresh temp dir, a 'new machine')")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="tiny-trainer-"))
    output_dir = Path(args.output_dir) if args.output_dir else work / "out"
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "neuron-compile-cache"
    os.environ["NEURON_COMPILE_CACHE_URL"] = str(cache_dir)  # where libneuronxla (here: the simulation) compiles
    assert resolve_cache_root().path == cache_dir.absolute()

    model_dir = output_dir / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir)  # name_or_path: a local directory, keyed by content

    compiles = SimulatedXlaCompiles(cache_dir)
    cache = NeuronCacheCallback(export_config={"sequence_length": 16}, compiler_version=COMPILER_VERSION)
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=len(NEW_GRAPH_STEPS), per_device_train_batch_size=2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens(), callbacks=[compiles, cache])
    trainer.train()

    report = cache.report
    run = report.run
    at_checkpoints = [key.rsplit("/", 1)[1] for key in report.checkpoint_published]
    at_end = [key.rsplit("/", 1)[1] for key in run.synced]
    print(f"bucket: {run.bucket}")
    print(f"before the first step: fetched {len(run.fetched)} entries")
    print(f"graphs compiled at steps {compiles.compiled_at_steps or 'none'}, {compiles.hits} cache hits")
    print(f"published at checkpoints: {len(at_checkpoints)}, at the end: {len(at_end)}; record: {run.record}")
    for warning in report.warnings + run.warnings:
        print(f"warning: {warning}")
    if args.json:
        print(json.dumps({"fetched": len(run.fetched), "compiled_at_steps": compiles.compiled_at_steps, "hits": compiles.hits,
                          "published_at_checkpoints": at_checkpoints, "published_at_end": at_end, "record": run.record,
                          "warnings": report.warnings + run.warnings}))


if __name__ == "__main__":
    main()
