"""The bucket server: the one process that talks to buckets.

It runs in an isolated environment (started with `uv`) that has a bucket-capable `huggingface_hub`, so the
caller's own, possibly pinned, `huggingface_hub` never matters. Importing this package imports nothing but
the standard library: the client side (`optimum_neuron_cache.client`) uses `bucket_server.protocol`.
"""

PROTOCOL_VERSION = 3
