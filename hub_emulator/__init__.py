"""Local emulator of the Hugging Face Hub bucket API, for tests and benchmarks (see ``hub.py``)."""

from .hub import HubEmulator, Link, RequestLog, RequestRecord, TokenInfo

__all__ = ["HubEmulator", "Link", "RequestLog", "RequestRecord", "TokenInfo"]
