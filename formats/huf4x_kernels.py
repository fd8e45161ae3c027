"""numba kernels of the ``huf4x`` exponent codec (specs/zmoe.md 3.3.1); the checks live in formats/huf4x.py.

Four interleaved LSB-first canonical Huffman streams per chunk, code lengths at most 11 bits. The
decoder looks up 11 bits at a time in a 2048-entry table (16 KiB) whose entries hold up to five whole
symbols (packed ``uint64``: symbols in bits 0-39, bits consumed in bits 40-47, symbol count in bits
48-55), writes the entry's eight bytes unconditionally and advances by the count; the four streams
are stepped in one loop so the core overlaps their lookups. One unaligned 64-bit load serves four
lookups (4 x 11 = 44 of its >= 57 valid bits). Measured on Zen 4 (CPU-time medians): up to 5 symbols
per entry decodes 3-5 % faster than up to 4; a 12-bit table gains another 0-6 % but doubles the
per-chunk table build, so it is not used. Four streams stepped together beat two pairs in turn
(1.55x), 3 + 1 (1.85x) and eight together (1.06x: eight streams' state spills from the registers);
writing BF16 directly (the merge fused into the loop, per lookup or per L1 block) was 2-5x slower
in numba than this loop plus the separate merge.

Memory safety does not depend on the coded bytes: the fast loop runs only while every stream has at
least 8 unread bytes inside its own region and 24 bytes of room in its output segment; the tail loop
reads byte by byte, zero-filling past the region's end, and writes one symbol at a time. Overruns are
reported by the return value and turned into a ``CodecError`` by the caller.

Little-endian hosts only (the unaligned loads are native-endian); formats/huf4x.py checks.
All kernels are ``nogil``; they keep no state and are thread-safe for distinct outputs.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

TABLE_BITS = 11  # lookup width == maximum code length
STREAMS = 4
MAXSYM = 5  # symbols per table entry


@intrinsic
def _load_u64(typingctx, arr, idx):  # pragma: no cover - compiled
    """Unaligned native-endian u64 load at byte ``idx`` of a uint8 array; the caller checks bounds."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(64).as_pointer())
        v = builder.load(ptr)
        v.align = 1
        return v
    return sig, codegen


@intrinsic
def _store_u64(typingctx, arr, idx, val):  # pragma: no cover - compiled
    sig = types.void(arr, idx, val)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(64).as_pointer())
        st = builder.store(args[2], ptr)
        st.align = 1
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _store_u32(typingctx, arr, idx, val):  # pragma: no cover - compiled
    """Unaligned native-endian store of the low 32 bits of ``val``; the caller checks bounds."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(32).as_pointer())
        st = builder.store(builder.trunc(args[2], ir.IntType(32)), ptr)
        st.align = 1
        return context.get_dummy_value()
    return sig, codegen


@njit(nogil=True, cache=True)
def canonical_codes(lens):  # pragma: no cover - compiled
    """Bit-reversed canonical codes (deflate order: by length, then symbol) for ``lens`` (int64[256])."""
    codes = np.zeros(256, np.uint64)
    code = 0
    for length in range(1, TABLE_BITS + 1):
        for s in range(256):
            if lens[s] == length:
                rev = 0
                for k in range(length):
                    rev |= ((code >> (length - 1 - k)) & 1) << k
                codes[s] = rev
                code += 1
        code <<= 1
    return codes


@njit(nogil=True, cache=True)
def build_tables(lens, codes):  # pragma: no cover - compiled
    """(multi-symbol table, single-symbol table) for a complete code with lengths <= TABLE_BITS."""
    m = 1 << TABLE_BITS
    sym = np.zeros(m, np.int64)
    sl = np.zeros(m, np.int64)
    for s in range(256):
        length = lens[s]
        if length == 0:
            continue
        for k in range(1 << (TABLE_BITS - length)):
            p = np.int64(codes[s]) | (k << length)
            sym[p] = s
            sl[p] = length
    multi = np.zeros(m, np.uint64)
    single = np.zeros(m, np.uint64)
    for p in range(m):
        single[p] = np.uint64(sym[p]) | (np.uint64(sl[p]) << np.uint64(8))
        used = 0
        cnt = 0
        v = np.uint64(0)
        while cnt < MAXSYM:
            q = p >> used
            if used + sl[q] > TABLE_BITS:
                break
            v |= np.uint64(sym[q]) << np.uint64(8 * cnt)
            used += sl[q]
            cnt += 1
        multi[p] = v | (np.uint64(used) << np.uint64(40)) | (np.uint64(cnt) << np.uint64(48))
    return multi, single


@njit(nogil=True, cache=True)
def tables_from_lengths(packed):  # pragma: no cover - compiled
    """Check 128 packed length bytes and build the decode tables in one call.

    Returns (status, detail, kraft, multi, single): status 0 = valid; 1 = symbol ``detail`` has a
    length over TABLE_BITS; 2 = fewer than 2 symbols (``detail`` of them); 3 = Kraft sum ``kraft``
    is not 2**TABLE_BITS (over-subscribed or incomplete). Tables are empty unless status is 0."""
    lens = np.zeros(256, np.int64)
    present = 0
    kraft = 0
    for k in range(128):
        lens[2 * k] = packed[k] & 15
        lens[2 * k + 1] = packed[k] >> 4
    for sym in range(256):
        if lens[sym] > TABLE_BITS:
            return 1, sym, 0, np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        if lens[sym]:
            present += 1
            kraft += 1 << (TABLE_BITS - lens[sym])
    if present < 2:
        return 2, present, 0, np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if kraft != 1 << TABLE_BITS:
        return 3, 0, kraft, np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    multi, single = build_tables(lens, canonical_codes(lens))
    return 0, 0, kraft, multi, single


@njit(nogil=True, cache=True)
def histograms(exp, segs):  # pragma: no cover - compiled
    """Symbol counts of each stream's elements: int64[STREAMS, 256] (4 partial counts for speed)."""
    h = np.zeros((STREAMS, 4, 256), np.int64)
    for s in range(STREAMS):
        i = segs[s]
        end = segs[s + 1]
        while i + 4 <= end:
            h[s, 0, exp[i]] += 1
            h[s, 1, exp[i + 1]] += 1
            h[s, 2, exp[i + 2]] += 1
            h[s, 3, exp[i + 3]] += 1
            i += 4
        while i < end:
            h[s, 0, exp[i]] += 1
            i += 1
    out = np.zeros((STREAMS, 256), np.int64)
    for s in range(STREAMS):
        for k in range(4):
            for v in range(256):
                out[s, v] += h[s, k, v]
    return out


@njit(nogil=True, cache=True)
def encode_streams(exp, segs, lens, codes, out, starts):  # pragma: no cover - compiled
    """Write stream s (elements ``[segs[s], segs[s+1])``) from byte ``starts[s]`` of ``out``; the caller
    sizes each stream exactly (its code bits from :func:`histograms`). Returns the stream byte sizes.

    A 4-byte store happens only when 32 complete bits are buffered, so no store touches a byte past
    the stream's own. (Interleaving the four streams in one loop measured slower in numba.)"""
    sizes = np.zeros(STREAMS, np.int64)
    for s in range(STREAMS):
        op = starts[s]
        acc = np.uint64(0)
        nb = 0
        for i in range(segs[s], segs[s + 1]):
            e = exp[i]
            acc |= codes[e] << np.uint64(nb)
            nb += lens[e]
            if nb >= 32:
                _store_u32(out, op, acc)
                op += 4
                acc >>= np.uint64(32)
                nb -= 32
        while nb > 0:
            out[op] = np.uint8(acc & np.uint64(0xFF))
            op += 1
            acc >>= np.uint64(8)
            nb -= 8
        sizes[s] = op - starts[s]
    return sizes


@njit(nogil=True, cache=True, inline="always")
def _safe_load(buf, pos, end):  # pragma: no cover - compiled
    v = np.uint64(0)
    for k in range(8):
        if pos + k < end:
            v |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
    return v


@njit(nogil=True, cache=True)
def decode_streams(buf, starts, ends, multi, single, out, segs):  # pragma: no cover - compiled
    """Decode the 4 streams (bytes ``[starts[s], ends[s])`` of ``buf``) into ``out[segs[s]:segs[s+1]]``.

    Returns 0, or ``1 + s`` when stream s does not end in its last byte (over-read or left over
    bytes), or ``5 + s`` when its padding bits are not zero.
    """
    m = np.uint64((1 << TABLE_BITS) - 1)
    b0 = starts[0] * 8
    b1 = starts[1] * 8
    b2 = starts[2] * 8
    b3 = starts[3] * 8
    o0 = segs[0]
    o1 = segs[1]
    o2 = segs[2]
    o3 = segs[3]
    x0 = ends[0] - 8
    x1 = ends[1] - 8
    x2 = ends[2] - 8
    x3 = ends[3] - 8
    while (o0 + 24 <= segs[1] and o1 + 24 <= segs[2] and o2 + 24 <= segs[3] and o3 + 24 <= segs[4]
           and (b0 >> 3) <= x0 and (b1 >> 3) <= x1 and (b2 >> 3) <= x2 and (b3 >> 3) <= x3):
        w0 = _load_u64(buf, b0 >> 3) >> np.uint64(b0 & 7)
        w1 = _load_u64(buf, b1 >> 3) >> np.uint64(b1 & 7)
        w2 = _load_u64(buf, b2 >> 3) >> np.uint64(b2 & 7)
        w3 = _load_u64(buf, b3 >> 3) >> np.uint64(b3 & 7)
        for _ in range(4):
            t0 = multi[w0 & m]
            t1 = multi[w1 & m]
            t2 = multi[w2 & m]
            t3 = multi[w3 & m]
            _store_u64(out, o0, t0)
            _store_u64(out, o1, t1)
            _store_u64(out, o2, t2)
            _store_u64(out, o3, t3)
            n0 = (t0 >> np.uint64(40)) & np.uint64(0xFF)
            n1 = (t1 >> np.uint64(40)) & np.uint64(0xFF)
            n2 = (t2 >> np.uint64(40)) & np.uint64(0xFF)
            n3 = (t3 >> np.uint64(40)) & np.uint64(0xFF)
            o0 += np.int64(t0 >> np.uint64(48))
            o1 += np.int64(t1 >> np.uint64(48))
            o2 += np.int64(t2 >> np.uint64(48))
            o3 += np.int64(t3 >> np.uint64(48))
            w0 >>= n0
            w1 >>= n1
            w2 >>= n2
            w3 >>= n3
            b0 += np.int64(n0)
            b1 += np.int64(n1)
            b2 += np.int64(n2)
            b3 += np.int64(n3)
    bits = (b0, b1, b2, b3)
    outs = (o0, o1, o2, o3)
    for s in range(STREAMS):
        b = bits[s]
        o = outs[s]
        oe = segs[s + 1]
        end = ends[s]
        while o + 8 <= oe and (b >> 3) <= end - 8:
            t = multi[(_load_u64(buf, b >> 3) >> np.uint64(b & 7)) & m]
            _store_u64(out, o, t)
            o += np.int64(t >> np.uint64(48))
            b += np.int64((t >> np.uint64(40)) & np.uint64(0xFF))
        while o < oe:
            t = single[(_safe_load(buf, b >> 3, end) >> np.uint64(b & 7)) & m]
            out[o] = np.uint8(t & np.uint64(0xFF))
            o += 1
            b += np.int64(t >> np.uint64(8))
        if (b + 7) >> 3 != end:
            return 1 + s
        if b & 7 and buf[end - 1] >> (b & 7) != 0:
            return 5 + s
    return 0
