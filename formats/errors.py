"""One exception family for everything the format layer rejects.

Every message is one line that names the file, tensor or offset and what is wrong, so the CLI can
print ``str(exc)`` as is.
"""


class ZmoeError(Exception):
    """Base class: bad input, corrupt archive, or a request the format cannot satisfy."""


class InputError(ZmoeError):
    """A source checkpoint (directory, config, safetensors shard) is missing or malformed."""


class FormatError(ZmoeError):
    """An archive violates specs/zmoe.md (magic, version, index, offsets, lengths)."""


class UnsupportedVersionError(FormatError):
    """The archive was written by a newer format version than this reader knows."""


class CorruptDataError(ZmoeError):
    """A checksum or hash does not match: the bytes on disk are not what was written."""


class CodecError(ZmoeError):
    """A chunk could not be encoded or decoded (unknown codec id, bad coded stream, length mismatch)."""
