"""Naming a bucket and resolving the default: argument, env, saved setting, embedded default."""

from __future__ import annotations

import pytest

from optimum_neuron_cache.buckets import BucketRef, embedded_default, parse_bucket, resolve_bucket, save_bucket
from optimum_neuron_cache.errors import InvalidBucketError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf://buckets/aws-neuron/cache", BucketRef("hf", "aws-neuron/cache")),
        ("aws-neuron/cache", BucketRef("hf", "aws-neuron/cache")),
        ("/mnt/fsx/neuron-bucket", BucketRef("dir", "/mnt/fsx/neuron-bucket")),
        ("file:///mnt/fsx/b", BucketRef("dir", "/mnt/fsx/b")),
    ],
)
def test_parse_bucket(spec, expected):
    assert parse_bucket(spec) == expected


@pytest.mark.parametrize("bad", ["", "justaname", "a/b/c", "s3://x/y", "ns/../x", "hf://buckets/ns"])
def test_invalid_bucket_names_are_refused_in_one_line(bad):
    with pytest.raises(InvalidBucketError) as info:
        parse_bucket(bad)
    assert "\n" not in str(info.value)


def test_resolution_order(tmp_path, monkeypatch):
    assert resolve_bucket(None) == embedded_default()
    assert str(embedded_default()).startswith(str(tmp_path))  # under the (test) user cache dir
    save_bucket(parse_bucket("saved/bucket"))
    assert resolve_bucket(None) == BucketRef("hf", "saved/bucket")
    monkeypatch.setenv("NEURON_CACHE_BUCKET", "env/bucket")
    assert resolve_bucket(None) == BucketRef("hf", "env/bucket")
    assert resolve_bucket("arg/bucket") == BucketRef("hf", "arg/bucket")
    save_bucket(None)
    monkeypatch.delenv("NEURON_CACHE_BUCKET")
    assert resolve_bucket(None) == embedded_default()
