"""Errors streamq raises on purpose.

Each one carries a message that names the problem and what to do about it, so the CLI can print it
as one line and library users can catch a specific class instead of parsing text.
"""

from __future__ import annotations


class StreamqError(Exception):
    """Base class: a problem streamq understood and explained."""


class SourceNotFoundError(StreamqError):
    """The source repo, revision or directory does not exist (or is hidden from this token)."""


class AccessDeniedError(StreamqError):
    """The token cannot read the source (gated/private) or cannot write the output."""


class NoSafetensorsError(StreamqError):
    """The source has no safetensors weights (for example only pickle `.bin` files)."""


class AlreadyQuantizedError(StreamqError):
    """The source is already quantized; re-quantizing it would stack two lossy steps."""


class CorruptShardError(StreamqError):
    """A safetensors file is truncated, malformed or does not match its checksum or index."""


class UnsupportedDtypeError(StreamqError):
    """A tensor has a dtype streamq cannot convert the way transformers would."""


class OutputNotWritableError(StreamqError):
    """The output directory or repo cannot be written."""


class ManifestMismatchError(StreamqError):
    """An existing output was made from another source revision or with other settings."""


class UnsupportedModelError(StreamqError):
    """The model cannot be planned (for example custom code without `trust_remote_code`)."""


class InsufficientDiskError(StreamqError):
    """The work directory cannot hold one input shard plus one output shard."""


class ConcurrentRunError(StreamqError):
    """Another run is writing the same output at the same time."""
