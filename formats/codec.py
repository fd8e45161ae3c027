"""Entropy codecs for BF16 exponent planes, coded in independently decodable chunks.

Codec ids (:data:`CODECS`, recorded per part in the archive index, specs/zmoe.md 3.3) name a coded
chunk format, not an encoder setting. ``zstd-lit``: one zstd frame (RFC 8878) whose content is exactly
the chunk's exponent bytes; any valid frame decodes, so encoder settings can change without touching
readers. Encoder settings are *presets* of a codec (:data:`ENCODER_PRESETS`), recorded in the index
for information via :func:`codec_params`.

``zstd-lit`` presets, measured on Gaussian std 0.02 BF16 exponents (order-0 entropy 2.545 bits,
per-128 KiB-block optimal Huffman ~2.59 bits), 1 MiB chunks, one core:

* ``fast`` (default): zstd ``fast`` strategy, ``min_match=7``, ``hash_log=6``, 128 KiB blocks
  (``window_log=17``). The 64-entry hash table finds almost no 7-byte matches, so blocks are
  Huffman-coded literals: 2.605 bits/exponent, encode >1 GB/s, decode ~4.5 GB/s BF16-equivalent.
* ``dfast``: same with the ``dfast`` strategy: 2.612 bits, encode ~0.9 GB/s, decode ~4.3 GB/s.
* ``btultra``: the btultra tuning first proposed: 2.648 bits (its optimal parser takes matches that
  cost more than the literals they replace), encode ~70 MB/s, decode ~3.1-3.5 GB/s.

Small windows are a trap: zstd caps the block size at the window, so with ``window_log=10`` every
1 KiB block carries its own Huffman table (2.89 bits, 1.1 GB/s decode). Hand-built literal-only
frames (optimal Huffman per block, no sequences) reach 2.599 bits: not worth a bespoke bitstream
writer for 0.006 bits.

``huf4x`` (formats/huf4x.py, specs/zmoe.md 3.3.1): a canonical Huffman code of lengths <= 11 per chunk
and four interleaved bitstreams, decoded by a numba table lookup that emits up to five exponents per
11-bit lookup. Gaussian: 2.595 bits/exponent (zstd-lit ``fast``: 2.605). Measured on AMD Zen 4 (one
core, CPU-time medians on a busy host; also with ``NUMBA_CPU_NAME=haswell``): the exponent stage decodes
1.25-1.6x as fast as zstd's, a whole chunk (xxh3 checks + exponents + merge) 1.1-1.3x. Encoding takes
about 2 ms per 2**20 exponents (zstd-lit ``fast``: 1.3 ms). One preset, ``l11`` (package-merge lengths).

Thread safety: :class:`ChunkEncoder` and :class:`ChunkDecoder` wrap one zstd context each and are
NOT thread-safe (a shared ``ZstdDecompressor`` corrupts output): use one per thread. The zstd calls
release the GIL, so one instance per thread scales. :func:`checksum`, :func:`codec_params` and the
registries are immutable and safe from any thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
import xxhash
import zstandard

from formats import huf4x
from formats.errors import CodecError

__all__ = [
    "CODECS",
    "DEFAULT_CHUNK_ELEMS",
    "DEFAULT_CODEC",
    "ENCODER_PRESETS",
    "CodecSpec",
    "ChunkDecoder",
    "ChunkEncoder",
    "checksum",
    "codec_params",
    "get_codec",
    "zstd_frame_check",
]

log = logging.getLogger(__name__)

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024


@dataclass(frozen=True)
class CodecSpec:
    """One registered exponent codec id: ``family`` names the decoder, ``default_preset`` the encoder."""

    codec_id: str
    family: str
    description: str
    default_preset: str


CODECS: Mapping[str, CodecSpec] = MappingProxyType({
    "zstd-lit": CodecSpec("zstd-lit", "zstd", "one zstd frame holding exactly the chunk's exponent bytes",
                          "fast"),
    "huf4x": CodecSpec("huf4x", "huffman", "canonical Huffman (lengths <= 11), 4 interleaved streams "
                       "(formats/huf4x.py)", "l11"),
})

#: What the packer writes unless told otherwise: huf4x decodes 1.3x faster than zstd-lit at the same
#: ratio (within 0.001 bit per exponent) on the hosts measured (README, Codec); zstd-lit stays readable.
DEFAULT_CODEC = "huf4x"

#: Default exponent chunk: 2**20 elements (1 MiB of exponents, 2 MiB of BF16 output). A format
#: parameter recorded in the archive; decoders take whatever the archive says.
DEFAULT_CHUNK_ELEMS = 1 << 20

_LIT = dict(min_match=7, search_log=1, window_log=17, hash_log=6, chain_log=6)

#: codec id -> preset name -> zstd compression parameters (JSON-serialisable).
ENCODER_PRESETS: Mapping[str, Mapping[str, Mapping[str, object]]] = MappingProxyType({
    "zstd-lit": MappingProxyType({
        "fast": MappingProxyType(dict(strategy="fast", **_LIT)),
        "dfast": MappingProxyType(dict(strategy="dfast", **_LIT)),
        "btultra": MappingProxyType(dict(strategy="btultra", **_LIT)),
    }),
    "huf4x": MappingProxyType({
        "l11": MappingProxyType(dict(max_code_length=huf4x.MAX_CODE_LENGTH, streams=4,
                                     lengths="package-merge")),
    }),
})

_STRATEGIES = {
    "fast": zstandard.STRATEGY_FAST,
    "dfast": zstandard.STRATEGY_DFAST,
    "btultra": zstandard.STRATEGY_BTULTRA,
}


def get_codec(codec_id: str) -> CodecSpec:
    """The registered spec for ``codec_id``; :class:`CodecError` naming it if unknown."""
    try:
        return CODECS[codec_id]
    except (KeyError, TypeError):
        known = ", ".join(sorted(CODECS))
        raise CodecError(f"unknown exponent codec id {codec_id!r} (known: {known})") from None


def _preset(codec_id: str, preset: str | None) -> tuple[CodecSpec, str, Mapping[str, object]]:
    spec = get_codec(codec_id)
    name = spec.default_preset if preset is None else preset
    presets = ENCODER_PRESETS[codec_id]
    if name not in presets:
        raise CodecError(f"unknown encoder preset {name!r} for codec {codec_id!r} "
                         f"(known: {', '.join(sorted(presets))})")
    return spec, name, presets[name]


def codec_params(codec_id: str, preset: str | None = None) -> dict:
    """JSON-serialisable description of the encoder settings (recorded in the index, informative)."""
    spec, name, params = _preset(codec_id, preset)
    if spec.family == "huffman":
        return {"family": spec.family, "preset": name, "huffman": dict(params)}
    return {
        "family": spec.family,
        "preset": name,
        "library": f"python-zstandard {zstandard.__version__}",
        "zstd_version": ".".join(str(v) for v in zstandard.ZSTD_VERSION),
        "zstd": dict(params),
    }


def checksum(buf) -> int:
    """xxh3_64 of ``buf`` (any contiguous buffer) as an int; the archive stores it as 16 hex digits."""
    return xxhash.xxh3_64_intdigest(buf)


def _as_u8(name: str, arr) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        arr = np.frombuffer(arr, dtype=np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
        raise CodecError(f"{name} must be a contiguous 1-D uint8 array")
    return arr


class ChunkEncoder:
    """Encodes exponent chunks with one codec and preset. Reusable; NOT thread-safe (one per thread).

    Output is deterministic for a given codec id, preset and zstd library version.
    """

    def __init__(self, codec_id: str = DEFAULT_CODEC, preset: str | None = None):
        self.spec, self.preset, params = _preset(codec_id, preset)
        self.codec_id = codec_id
        self._cctx = None
        if self.spec.family == "huffman":
            return
        cp = zstandard.ZstdCompressionParameters(
            strategy=_STRATEGIES[params["strategy"]], min_match=params["min_match"],
            search_log=params["search_log"], window_log=params["window_log"], hash_log=params["hash_log"],
            chain_log=params["chain_log"], write_checksum=0, write_content_size=1, write_dict_id=0)
        self._cctx = zstandard.ZstdCompressor(compression_params=cp)

    def encode(self, exp) -> bytes:
        """Code one chunk of exponent bytes (a uint8 array or buffer) into one coded chunk."""
        arr = _as_u8("exponent chunk", exp)
        if self._cctx is None:
            return huf4x.encode(arr)
        try:
            return self._cctx.compress(arr)
        except zstandard.ZstdError as exc:  # pragma: no cover - zstd does not fail on valid input
            raise CodecError(f"{self.codec_id}: encoding {arr.size} exponents failed: {exc}") from exc


def zstd_frame_check(coded, n: int) -> bool:
    """Walk one zstd frame's headers: raise :class:`CodecError` unless it is exactly one complete
    frame (no trailing bytes, no dictionary) whose content size, if recorded, is ``n``. Returns
    whether the content size is recorded.

    Cheap (a few block headers per 128 KiB). With the size recorded, zstd decodes in one pass
    straight into the ``n``-byte output and allocates nothing else of note.
    """
    try:
        mv = memoryview(coded).cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"coded chunk is not a contiguous buffer: {exc}") from None
    size = len(mv)
    if size < 6 or int.from_bytes(mv[0:4], "little") != _ZSTD_MAGIC:
        raise CodecError("coded chunk is not a zstd frame (bad magic or too short)")
    fhd = mv[4]
    fcs_flag, single, reserved, has_checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, \
        (fhd >> 2) & 1, fhd & 3
    if reserved or dict_flag:
        raise CodecError("zstd frame uses a reserved bit or a dictionary")
    pos = 5 + (0 if single else 1)
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if pos + fcs_len > size:
        raise CodecError("zstd frame header truncated")
    if fcs_len:
        fcs = int.from_bytes(mv[pos:pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
        if fcs != n:
            raise CodecError(f"zstd frame records {fcs} bytes, expected {n}")
    pos += fcs_len
    while True:
        if pos + 3 > size:
            raise CodecError(f"zstd frame truncated at byte {pos} of {size}")
        bh = int.from_bytes(mv[pos:pos + 3], "little")
        btype, bsize = (bh >> 1) & 3, bh >> 3
        if btype == 3 or bsize > _ZSTD_BLOCK_MAX:
            raise CodecError(f"zstd block header at byte {pos} is invalid")
        pos += 3 + (1 if btype == 1 else bsize)
        if bh & 1:
            break
    pos += 4 if has_checksum else 0
    if pos != size:
        kind = "truncated" if pos > size else f"followed by {size - pos} trailing bytes"
        raise CodecError(f"zstd frame {kind}")
    return fcs_len > 0


class ChunkDecoder:
    """Decodes exponent chunks of any registered codec. Reusable; NOT thread-safe (one per thread).

    The zstd call releases the GIL, so one decoder per worker thread decodes in parallel.
    """

    #: Largest window accepted for frames that do not record their content size (those decode in
    #: streaming mode through a window buffer); frames that do decode in one pass without one.
    MAX_STREAMING_WINDOW = 1 << 23

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor(max_window_size=self.MAX_STREAMING_WINDOW)
        self._scratch = np.empty(0, dtype=np.uint8)
        self._huf_tables = huf4x.TableCache()

    def scratch(self, n: int) -> np.ndarray:
        """A reusable ``n``-byte exponent buffer owned by this decoder (grown on demand, never shrunk)."""
        if self._scratch.shape[0] < n:
            self._scratch = np.empty(n, dtype=np.uint8)
        return self._scratch[:n]

    def decode_exp(self, codec_id: str, coded, n: int, out: np.ndarray) -> None:
        """Decode ``coded`` into ``out[:n]``; exactly ``n`` bytes or :class:`CodecError`.

        Writes only into ``out`` (no other n-sized allocation). Content integrity is the caller's job
        (the archive's per-chunk xxh3); this checks the stream's structure and length.
        """
        get_codec(codec_id)
        n = int(n)
        if n < 0:
            raise CodecError(f"negative exponent count {n}")
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1 \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise CodecError("out must be a writeable contiguous 1-D uint8 array")
        if out.shape[0] < n:
            raise CodecError(f"out holds {out.shape[0]} bytes, {n} needed")
        if codec_id == huf4x.CODEC_ID:
            huf4x.decode(coded, n, out, self._huf_tables)
            return
        sized = zstd_frame_check(coded, n)
        try:
            reader = self._dctx.stream_reader(coded, read_across_frames=False)
            got = 0
            while got < n:  # one pass when the size is recorded; streaming may take several
                k = reader.readinto(out[got:n])
                if k == 0:
                    break
                got += k
            extra = b"" if sized else reader.read(1)
        except (zstandard.ZstdError, ValueError) as exc:
            raise CodecError(f"{codec_id}: corrupt coded exponent stream: {exc}") from exc
        if got != n or extra:
            what = f"{got}" if not extra else f"more than {n}"
            raise CodecError(f"{codec_id}: coded exponent stream decodes to {what} bytes, expected {n}")
