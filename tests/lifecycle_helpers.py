"""Helpers shared by the bucket-lifecycle tests (prune, scrub, du): the CLI in-process, a bucket as its
commands name it."""

from __future__ import annotations

from click.testing import CliRunner

from optimum_neuron_cache.buckets import BucketRef
from optimum_neuron_cache.cli import cli


def run(*args: str, code: int = 0) -> str:
    """`neuron-cache ARGS` in-process; asserts the exit code and returns what it printed."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


def uri(ref: BucketRef) -> str:
    """A bucket as a user names it on the command line."""
    return f"hf://buckets/{ref.location}" if ref.kind == "hf" else ref.location
