"""The fixed 64-byte preamble (specs/zmoe.md section 2)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from formats.errors import FormatError, UnsupportedVersionError

MAGIC = b"\x89ZMOE\r\n\x1a"
VERSION = 1
PREAMBLE_SIZE = 64
ALIGNMENT = 4096
MAX_INDEX_LENGTH = 512 << 20
_STRUCT = struct.Struct("<8sIIQQQQQ")  # 56 bytes, then the u64 preamble checksum


def align(x: int, a: int = ALIGNMENT) -> int:
    return (x + a - 1) // a * a


def xxh3(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def hex64(v: int) -> str:
    return f"{v:016x}"


@dataclass(frozen=True)
class Preamble:
    version: int
    index_length: int
    data_offset: int
    file_length: int
    index_xxh3: int

    def pack(self) -> bytes:
        head = _STRUCT.pack(MAGIC, self.version, 0, PREAMBLE_SIZE, self.index_length,
                            self.data_offset, self.file_length, self.index_xxh3)
        return head + struct.pack("<Q", xxh3(head))


def read_preamble(buf, file_length: int, where: str) -> Preamble:
    """Check the preamble in the order the spec gives; `buf` holds at least the first 64 bytes."""
    if file_length < PREAMBLE_SIZE:
        raise FormatError(f"{where}: file is {file_length} bytes, shorter than the 64-byte preamble")
    head = bytes(buf[:56])
    magic, version, flags, index_offset, index_length, data_offset, flen, index_x = _STRUCT.unpack(head)
    if magic != MAGIC:
        raise FormatError(f"{where}: not a .zmoe archive (bad magic {magic!r} at offset 0)")
    (stored,) = struct.unpack("<Q", bytes(buf[56:64]))
    if stored != xxh3(head):
        raise FormatError(f"{where}: preamble checksum mismatch at offset 56 (preamble is corrupt)")
    if version > VERSION:
        raise UnsupportedVersionError(
            f"{where}: format version {version} is newer than this reader supports (newest: {VERSION}); upgrade zipmoe")
    if version < 1:
        raise FormatError(f"{where}: invalid format version {version} at offset 8")
    if flags != 0:
        raise FormatError(f"{where}: unknown flags 0x{flags:x} at offset 12")
    if index_offset != PREAMBLE_SIZE:
        raise FormatError(f"{where}: index offset {index_offset} at offset 16 must be 64")
    if not 1 <= index_length <= MAX_INDEX_LENGTH:
        raise FormatError(f"{where}: index length {index_length} at offset 24 is outside 1..{MAX_INDEX_LENGTH}")
    if PREAMBLE_SIZE + index_length > file_length:
        raise FormatError(f"{where}: index length {index_length} runs past the end of the {file_length}-byte file")
    if data_offset % ALIGNMENT or data_offset < PREAMBLE_SIZE + index_length or data_offset > file_length:
        raise FormatError(f"{where}: data offset {data_offset} at offset 32 is misaligned or out of range")
    if flen != file_length:
        raise FormatError(f"{where}: preamble says {flen} bytes but the file has {file_length} (truncated or extended)")
    return Preamble(version, index_length, data_offset, flen, index_x)
