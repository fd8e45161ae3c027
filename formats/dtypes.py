"""Safetensors dtype names and their sizes in bits (the archive stores dtypes by these names)."""
from __future__ import annotations

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
    "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Bytes of a tensor, with the checks a hostile header needs (Python ints cannot overflow)."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ValueError(f"bad dimension {d!r} in shape {list(shape)}")
        n *= d
    total_bits = n * bits
    if total_bits % 8:
        raise ValueError(f"{dtype} tensor of shape {list(shape)} is not a whole number of bytes")
    return total_bits // 8
