"""optimum-neuron-cache: share AWS Neuron compile artifacts through Hugging Face Storage Buckets."""

from ._version import __version__
from .context import CacheRun, hub_neuronx_cache

__all__ = ["CacheRun", "hub_neuronx_cache", "__version__"]
