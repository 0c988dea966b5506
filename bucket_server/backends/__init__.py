"""Bucket backends behind one interface: `hf` (a Hub bucket through HfApi) and `dir` (a directory)."""

from .base import Backend, BackendError, validate_remote_path

__all__ = ["Backend", "BackendError", "validate_remote_path"]
