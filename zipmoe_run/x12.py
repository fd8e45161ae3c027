"""X12: a fixed-width, exactly invertible 12-bit form of a BF16 matrix (about 0.75 of its bytes).

A decode step is bound by memory bandwidth, so a matrix that holds fewer bytes per weight and can be
read directly by the GEMV (``x12_kernel``) moves less memory per token. Each bf16 weight (sign 1 bit,
exponent 8, mantissa 7) is split into

* a 4-bit exponent *code*: the matrix's 15 most frequent exponent values (ties: the smaller value)
  get codes 0..14, assigned in ascending exponent order (``table[code]`` is the exponent); code 15 is
  an *escape*, meaning "the exponent is in the escape list";
* the sign+mantissa byte ``sm = sign << 7 | mantissa`` (the same byte as the archive's SM plane).

Layout of an :class:`X12` of a [N, K] matrix (Kp = K rounded up to even; a pad element of an odd K
is code 0, sm 0 and is dropped on decode):

====================  ====================  ===================================================
field                 dtype, shape          meaning
====================  ====================  ===================================================
``nibbles``           uint8 [N, Kp/2]       code of element 2j in the low nibble of byte j, 2j+1 high
``sm``                uint8 [N, Kp]         sign+mantissa bytes
``table``             uint8 [16]            exponent of codes 0..14 (entry 15 unused, 0)
``row_ptr``           uint32|int64 [N+1]    escapes of row i are ``row_ptr[i]:row_ptr[i+1]``
``esc_col``           uint16|uint32 [E]     their columns, ascending within a row
``esc_exp``           uint8 [E]             their exponents
====================  ====================  ===================================================

When the table is 15 consecutive exponents (always for trained or Gaussian weights, whose exponents
are unimodal: ``contiguous``), a code decodes by an add (``base + code``), which vectorizes; any
other table decodes by a 16-entry lookup. Every bf16 bit pattern round-trips (NaN payloads,
infinities, subnormals, zeros of either sign, rows of nothing but escapes): ``to_bf16(from_bf16(w))
== w`` byte for byte. torch-free (numpy + numba; numpy only, slower, without numba).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["X12", "from_bf16", "to_bf16", "decode_into", "ESCAPE"]

ESCAPE = 15  # the code of an exponent not in the table

PAIRS = 16  # bf16 pairs (uint32 words) decoded per vector step: 32 weights, one block of the GEMV's order

try:
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency
    njit = None


@dataclass(frozen=True)
class X12:
    """One [N, K] bf16 matrix in the 12-bit form (see the module doc for the fields)."""

    shape: tuple[int, int]
    nibbles: np.ndarray  # uint8 [N, Kp/2]
    sm: np.ndarray  # uint8 [N, Kp]
    table: np.ndarray  # uint8 [16]
    row_ptr: np.ndarray  # uint32 | int64 [N+1]
    esc_col: np.ndarray  # uint16 | uint32 [E]
    esc_exp: np.ndarray  # uint8 [E]

    @property
    def base(self) -> int:
        return int(self.table[0])

    @cached_property
    def contiguous(self) -> bool:
        """Codes 0..14 are the exponents base..base+14 (decoded by an add rather than a lookup)."""
        return _contiguous(self.table)

    @cached_property
    def kernel_base(self) -> int:
        """What the numba decoders take: ``base`` for a contiguous table, else -1 (lookup)."""
        return self.base if self.contiguous else -1

    @property
    def escapes(self) -> int:
        return int(self.esc_exp.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes held by the arrays (what a resident X12 costs, less Python object overhead)."""
        return int(sum(a.nbytes for a in (self.nibbles, self.sm, self.table, self.row_ptr, self.esc_col,
                                          self.esc_exp)))

    @property
    def bf16_nbytes(self) -> int:
        return 2 * self.shape[0] * self.shape[1]

    @property
    def ratio(self) -> float:
        return self.nbytes / max(1, self.bf16_nbytes)


def _choose_table(hist: np.ndarray) -> np.ndarray:
    """uint8 [16]: the 15 most frequent exponents (ties: smaller value) in ascending order; when they
    span at most 15 values (fewer than 15 distinct exponents too), the 15 consecutive values from the
    smallest (shifted down to end at 255), so the table stays contiguous."""
    order = sorted(range(256), key=lambda e: (-int(hist[e]), e))
    top = sorted(e for e in order[:ESCAPE] if hist[e] > 0) or [0]
    if top[-1] - top[0] < ESCAPE:
        b = min(top[0], 255 - (ESCAPE - 1))
        vals = list(range(b, b + ESCAPE))
    else:
        vals = sorted(order[:ESCAPE])
    return np.array(vals + [0], np.uint8)


def _contiguous(table: np.ndarray) -> bool:
    return bool(np.array_equal(table[:ESCAPE].astype(np.int32), int(table[0]) + np.arange(ESCAPE)))


def _lut(table: np.ndarray) -> np.ndarray:
    """uint8 [256]: exponent -> code (15 for exponents not in the table)."""
    lut = np.full(256, ESCAPE, np.uint8)
    lut[table[:ESCAPE]] = np.arange(ESCAPE, dtype=np.uint8)
    return lut


def from_bf16(w: np.ndarray) -> X12:
    """Encode bf16 bit patterns w uint16 [N, K] (or [K]: one row) into an :class:`X12`."""
    w = np.asarray(w)
    if w.dtype != np.uint16:
        raise TypeError(f"x12 encodes bf16 bit patterns as uint16, got {w.dtype}")
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise ValueError(f"x12 encodes a 2-D matrix, got shape {w.shape}")
    n, k = w.shape
    w = np.ascontiguousarray(w)
    kp = k + (k & 1)
    if njit is None:
        hist = np.bincount((w >> 7 & 0xFF).ravel(), minlength=256)
    else:
        hist = _hist_pairs(w.view(np.uint32)) if k % 2 == 0 else _hist(w)
    table = _choose_table(hist)
    lut = _lut(table)
    nib = np.empty((n, kp // 2), np.uint8)
    sm = np.zeros((n, kp), np.uint8)
    counts = np.zeros(n, np.int64)
    if njit is not None and k % 2 == 0 and _contiguous(table):  # every trained matrix: arithmetic codes
        _encode_pairs(w.view(np.uint32), int(table[0]), nib, sm.view(np.uint16), counts)
    elif njit is not None:
        _encode_rows(w, lut, nib, sm, counts)
    else:
        codes = np.zeros((n, kp), np.uint8)
        codes[:, :k] = lut[(w >> 7) & 0xFF]
        nib[:] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        sm[:, :k] = ((w >> 8) & 0x80 | (w & 0x7F)).astype(np.uint8)
        counts[:] = (codes[:, :k] == ESCAPE).sum(axis=1)
    total = int(counts.sum())
    row_ptr = np.zeros(n + 1, np.uint32 if total < (1 << 32) else np.int64)
    row_ptr[1:] = np.cumsum(counts)
    esc_col = np.empty(total, np.uint16 if k <= (1 << 16) else np.uint32)
    esc_exp = np.empty(total, np.uint8)
    if total:
        if njit is not None:
            _fill_escapes(w, lut, row_ptr, esc_col, esc_exp)  # scans only the rows that have escapes
        else:
            rows, cols = np.nonzero(lut[(w >> 7) & 0xFF] == ESCAPE)
            esc_col[:] = cols
            esc_exp[:] = (w[rows, cols] >> 7) & 0xFF
    return X12((n, k), nib, sm, table, row_ptr, esc_col, esc_exp)


def to_bf16(x: X12) -> np.ndarray:
    """Decode back to bf16 bit patterns uint16 [N, K] (a new array)."""
    n, k = x.shape
    kp = x.sm.shape[1]
    out = np.empty((n, kp // 2), np.uint32)  # bf16 pairs, little endian
    decode_into(x, out)
    full = out.view(np.uint16).reshape(n, kp)
    return full if kp == k else np.ascontiguousarray(full[:, :k])


def decode_into(x: X12, out: np.ndarray) -> None:
    """Decode into out uint32 [N, Kp/2] (bf16 pairs; numba, rows split over its threads)."""
    n, kp = x.sm.shape
    if out.dtype != np.uint32 or out.shape != (n, kp // 2) or not out.flags.c_contiguous:
        raise ValueError(f"x12 decode needs a C-contiguous uint32 [{n}, {kp // 2}] output, got "
                         f"{out.dtype} {out.shape}")
    if njit is None:
        _decode_numpy(x, out)
        return
    sm16 = x.sm.view(np.uint16)  # [N, Kp/2]: sm of element 2j in the low byte
    _decode_rows(x.nibbles, sm16, x.table, x.kernel_base, x.row_ptr, x.esc_col, x.esc_exp, out)


def _decode_numpy(x: X12, out: np.ndarray) -> None:
    n, kp = x.sm.shape
    codes = np.empty((n, kp), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = x.nibbles & 15, x.nibbles >> 4
    exp = x.table[codes].astype(np.uint16)
    rows = np.repeat(np.arange(n), np.diff(x.row_ptr.astype(np.int64)))
    exp[rows, x.esc_col.astype(np.int64)] = x.esc_exp
    s = x.sm.astype(np.uint16)
    out.view(np.uint16).reshape(n, kp)[:] = (s & 0x80) << 8 | exp << 7 | (s & 0x7F)


if njit is not None:
    @njit(parallel=True, nogil=True, cache=True)
    def _hist(w):  # w uint16 [N, K] -> int64 [256] exponent histogram
        n, k = w.shape
        rows = 64
        tasks = (n + rows - 1) // rows
        hs = np.zeros((tasks, 256), np.int64)
        for c in prange(tasks):
            h = np.zeros(256, np.int64)
            for i in range(c * rows, min(n, (c + 1) * rows)):
                for j in range(k):
                    h[(np.uint32(w[i, j]) >> np.uint32(7)) & np.uint32(0xFF)] += 1
            hs[c] = h
        return hs.sum(axis=0)

    @njit(parallel=True, nogil=True, cache=True)
    def _hist_pairs(w32):  # w32 uint32 [N, K/2] (bf16 pairs) -> int64 [256]; two tables: no store-forwarding chain
        n, kh = w32.shape
        rows = 64
        tasks = (n + rows - 1) // rows
        hs = np.zeros((tasks, 512), np.int64)
        for c in prange(tasks):
            h = np.zeros(512, np.int64)
            for i in range(c * rows, min(n, (c + 1) * rows)):
                for j in range(kh):
                    u = w32[i, j]
                    h[(u >> np.uint32(7)) & np.uint32(0xFF)] += 1
                    h[256 + ((u >> np.uint32(23)) & np.uint32(0xFF))] += 1
            hs[c] = h
        t = hs.sum(axis=0)
        return t[:256] + t[256:]

    @njit(parallel=True, nogil=True, cache=True)
    def _encode_pairs(w32, base, nib, sm16, counts):
        """Even K, contiguous table: w32 uint32 [N, K/2] (bf16 pairs) -> nib, sm16 uint16 [N, K/2], escapes
        per row. Codes by arithmetic (exponent - base, 15 when outside 0..14), which vectorizes."""
        n, kh = w32.shape
        b = np.uint32(base)
        for i in prange(n):
            c = 0
            for j in range(kh):
                u = w32[i, j]
                ca = min(np.uint32(((u >> np.uint32(7)) - b) & np.uint32(0xFF)), np.uint32(15))
                cb = min(np.uint32(((u >> np.uint32(23)) - b) & np.uint32(0xFF)), np.uint32(15))
                c += np.int64(ca == 15) + np.int64(cb == 15)
                nib[i, j] = np.uint8(ca | (cb << np.uint32(4)))
                lo = ((u >> np.uint32(8)) & np.uint32(0x80)) | (u & np.uint32(0x7F))  # sm of element 2j
                hi = ((u >> np.uint32(16)) & np.uint32(0x8000)) | ((u >> np.uint32(8)) & np.uint32(0x7F00))  # 2j+1
                sm16[i, j] = np.uint16(lo | hi)
            counts[i] = c

    @njit(parallel=True, nogil=True, cache=True)
    def _encode_rows(w, lut, nib, sm, counts):  # -> nib [N, Kp/2], sm [N, Kp], counts [N] escapes per row
        n, k = w.shape
        for i in prange(n):
            c = 0
            for j in range(0, k - 1, 2):
                a, b = w[i, j], w[i, j + 1]
                ca, cb = lut[(a >> 7) & 0xFF], lut[(b >> 7) & 0xFF]
                c += (ca == ESCAPE) + (cb == ESCAPE)
                nib[i, j >> 1] = ca | (cb << 4)
                sm[i, j] = ((a >> 8) & 0x80) | (a & 0x7F)
                sm[i, j + 1] = ((b >> 8) & 0x80) | (b & 0x7F)
            if k & 1:
                a = w[i, k - 1]
                ca = lut[(a >> 7) & 0xFF]
                c += ca == ESCAPE
                nib[i, k >> 1] = ca
                sm[i, k - 1] = ((a >> 8) & 0x80) | (a & 0x7F)
            counts[i] = c

    @njit(parallel=True, nogil=True, cache=True)
    def _fill_escapes(w, lut, row_ptr, esc_col, esc_exp):
        n, k = w.shape
        for i in prange(n):
            t = row_ptr[i]
            if t == row_ptr[i + 1]:
                continue
            for j in range(k):
                e = (w[i, j] >> 7) & 0xFF
                if lut[e] == ESCAPE:
                    esc_col[t] = j
                    esc_exp[t] = e
                    t += 1

    from llvmlite import binding as _llvm

    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"  # opaque pointers

    @intrinsic
    def _pairs_vec(typingctx, nib, sm16, i, bword, dst, nv, pf):
        """Pairs 0 .. nv*PAIRS-1 of row i (contiguous table) into dst uint32 [>= nv*PAIRS], PAIRS per step.

        LLVM vector IR in 32-bit lanes (numba's scalar typing widens integer arithmetic to 64 bits, which
        halves the vector width and adds packing): for pair j with code byte c and sm bytes s0, s1,
        word = ((c * 0x80080) & 0x07800780) + bword | (sext16(s0) & 0x807F | (sext16(s1) & 0x807F) << 16),
        with bword = base << 7 | base << 23. Plain IR, no target intrinsics: one step is a 512-bit vector
        of AVX-512, two of AVX2, four of SSE or NEON. Each step also prefetches the same columns of row
        ``pf`` (the next row: it keeps the memory streams ahead while this row computes; a hint only,
        ``llvm.prefetch``, dropped on targets without one)."""
        sig = types.void(nib, sm16, i, bword, dst, nv, pf)

        def codegen(context, builder, signature, args):
            na = context.make_array(signature.args[0])(context, builder, value=args[0])
            sa = context.make_array(signature.args[1])(context, builder, value=args[1])
            da = context.make_array(signature.args[4])(context, builder, value=args[4])
            i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
            p = PAIRS
            vb, vs, vh, vw = ir.VectorType(i8, p), ir.VectorType(i8, 2 * p), ir.VectorType(i16, 2 * p), \
                ir.VectorType(i32, p)

            def row_ptr(arr, vt, row):
                off = builder.mul(row, cgutils.unpack_tuple(builder, arr.strides, 2)[0])  # bytes
                return builder.bitcast(builder.gep(builder.bitcast(arr.data, i8.as_pointer()), [off]), vt.as_pointer())

            npv, spv = row_ptr(na, vb, args[2]), row_ptr(sa, vs, args[2])
            npf, spf = row_ptr(na, vb, args[6]), row_ptr(sa, vs, args[6])
            pfn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
                i8.as_pointer(), i32, i32, i32]), _PREFETCH)
            rd, loc, dcache = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
            dpv = builder.bitcast(da.data, vw.as_pointer())
            bw = builder.insert_element(ir.Constant(vw, ir.Undefined), args[3], ir.Constant(i32, 0))
            bw = builder.shuffle_vector(bw, ir.Constant(vw, ir.Undefined), ir.Constant(vw, [0] * p))  # splat

            def splat(t, v):
                return ir.Constant(t, [v] * t.count)

            with cgutils.for_range(builder, args[5]) as loop:
                v = loop.index
                for q in (npf, spf):
                    builder.call(pfn, [builder.bitcast(builder.gep(q, [v]), i8.as_pointer()), rd, loc, dcache])
                c = builder.zext(builder.load(builder.gep(npv, [v]), align=1), vw)  # [16] code bytes
                # c * (1 << 7 | 1 << 19) holds c << 7 and c << 19; the mask keeps low nibble << 7 and high << 23
                codes = builder.and_(builder.mul(c, splat(vw, 0x80080)), splat(vw, 0x07800780))
                sm = builder.sext(builder.load(builder.gep(spv, [v]), align=1), vh)  # [32] sign-extended
                sm = builder.bitcast(builder.and_(sm, splat(vh, 0x807F)), vw)  # sign << 15 | mantissa, per half
                builder.store(builder.or_(builder.add(codes, bw), sm), builder.gep(dpv, [v]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    @njit(inline="always", nogil=True)
    def _word(s, lo_exp, hi_exp):
        """The bf16 pair (uint32) of sm bytes s (uint16: element 2j low) and the two exponents (uint32)."""
        return np.uint32(((s & np.uint32(0x80)) << np.uint32(8)) | (lo_exp << np.uint32(7)) | (s & np.uint32(0x7F))
                         | ((s & np.uint32(0x8000)) << np.uint32(16)) | (hi_exp << np.uint32(23))
                         | ((s & np.uint32(0x7F00)) << np.uint32(8)))

    @njit(inline="always", nogil=True)
    def _patch(dst, j, s, col, e):
        """Overwrite the half of dst[j] holding element col (2j or 2j+1) with exponent e and its sm byte."""
        if col & 1:  # the high half: element 2j+1, its sm in the high byte of s
            half = (s & np.uint32(0x8000)) | (e << np.uint32(7)) | ((s >> np.uint32(8)) & np.uint32(0x7F))
            dst[j] = (dst[j] & np.uint32(0xFFFF)) | np.uint32(half << np.uint32(16))
        else:
            half = ((s & np.uint32(0x80)) << np.uint32(8)) | (e << np.uint32(7)) | (s & np.uint32(0x7F))
            dst[j] = (dst[j] & np.uint32(0xFFFF0000)) | np.uint32(half)

    @njit(inline="always", nogil=True)
    def decode_pairs(nib, sm16, b, esc_col, esc_exp, i, j0, j1, t, tend, dst):
        """Pairs j0..j1-1 of row i (contiguous table from exponent b, uint32) into dst[j0:j1], scalar; then
        the row's escapes t.. that fall in them (t: the first with a column >= 2*j0; tend: the row's end).
        Returns the first escape after them. A code 15 may carry into bit 15 / bit 31 (b + 15 = 256):
        the patch rewrites that whole half-word, so nothing leaks into the other half."""
        for j in range(j0, j1):
            c = np.uint32(nib[i, j])
            dst[j] = _word(np.uint32(sm16[i, j]), np.uint32(b + (c & np.uint32(15))),
                           np.uint32(b + (c >> np.uint32(4))))
        while t < tend and np.int64(esc_col[t]) < 2 * j1:
            col = np.int64(esc_col[t])
            _patch(dst, col >> 1, np.uint32(sm16[i, col >> 1]), col, np.uint32(esc_exp[t]))
            t += 1
        return t

    @njit(inline="always", nogil=True)
    def decode_row(nib, sm16, table, base, row_ptr, esc_col, esc_exp, i, dst):
        """Row i of an X12 into dst uint32 [Kp/2] (bf16 pairs). base >= 0: contiguous table."""
        kh = nib.shape[1]
        t, tend = row_ptr[i], row_ptr[i + 1]
        if base >= 0:
            b = np.uint32(base)
            nv = kh // PAIRS
            _pairs_vec(nib, sm16, i, np.uint32((b << np.uint32(7)) | (b << np.uint32(23))), dst, nv,
                       min(i + 1, nib.shape[0] - 1))
            decode_pairs(nib, sm16, b, esc_col, esc_exp, i, nv * PAIRS, kh, tend, tend, dst)  # the last pairs
        else:
            for j in range(kh):
                c = nib[i, j]
                dst[j] = _word(np.uint32(sm16[i, j]), np.uint32(table[c & 15]), np.uint32(table[c >> 4]))
        for t in range(t, tend):
            col = np.int64(esc_col[t])
            _patch(dst, col >> 1, np.uint32(sm16[i, col >> 1]), col, np.uint32(esc_exp[t]))

    @njit(parallel=True, nogil=True, cache=True)
    def _decode_rows(nib, sm16, table, base, row_ptr, esc_col, esc_exp, out):  # out uint32 [N, Kp/2]
        for i in prange(nib.shape[0]):
            decode_row(nib, sm16, table, base, row_ptr, esc_col, esc_exp, i, out[i])
