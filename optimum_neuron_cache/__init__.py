"""optimum-neuron-cache: share AWS Neuron compile artifacts through Hugging Face Storage Buckets."""

__version__ = "0.1.0"

from .context import CacheRun, hub_neuronx_cache  # noqa: E402

__all__ = ["CacheRun", "hub_neuronx_cache", "__version__"]
