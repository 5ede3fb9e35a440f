"""Shared-memory rings and the messages that cross them. Imports neither torch nor the web stack."""

from ringllm.ipc.ring import PeerDied, RingCorrupted, RingError, RingReader, RingTimeout, RingWriter

__all__ = ["PeerDied", "RingCorrupted", "RingError", "RingReader", "RingTimeout", "RingWriter"]
