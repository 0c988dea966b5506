"""Typed errors of optimum-neuron-cache.

Every error a user can meet says, in one line, what was wrong and what to do. Remote errors are mapped from
the bucket server's error *codes* (see `bucket_server.protocol.ErrorCode`), never from message text.
"""

from __future__ import annotations


class NeuronCacheError(Exception):
    """Base class of every error raised by optimum-neuron-cache."""


class ConfigurationError(NeuronCacheError, ValueError):
    """Bad input from the user: a malformed bucket id, model id, compiler version or cache dir."""


class CompilerVersionError(ConfigurationError):
    """The neuronx-cc version could not be determined or is malformed."""


class InvalidBucketError(ConfigurationError):
    """A bucket name that is neither a Hub bucket id nor a local directory."""


class InvalidModelIdError(ConfigurationError):
    """A model id that is not a Hub model id nor an existing local directory."""


class RemoteError(NeuronCacheError):
    """The bucket (or the server in front of it) could not do what was asked."""

    #: Whether retrying the same idempotent request may succeed.
    retryable: bool = False


class BucketNotFoundError(RemoteError):
    """The bucket does not exist, or is private and the token cannot see it."""


class BucketAuthError(RemoteError):
    """The token is missing, invalid, or lacks the permission the operation needs (401/403)."""


class RemoteUnavailableError(RemoteError):
    """Network failure, timeout, 5xx or rate limit after the bounded retries."""

    retryable = True


class RemoteInvalidDataError(RemoteError):
    """The bucket returned something that cannot be trusted (bad path, size mismatch, corrupt listing)."""


class ServerError(RemoteError):
    """The bucket server failed: could not start, crashed, or broke the protocol."""

    retryable = True


class ServerStartError(ServerError):
    """The bucket server could not be started."""


class ProtocolMismatchError(ServerError):
    """The running bucket server speaks another protocol version."""
