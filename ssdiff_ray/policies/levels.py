"""Conversions between bit-widths and quantization levels shared by the adaptive policies."""

import numpy as np

from ssdiff_ray.codec import SUPPORTED_BITS


def bits_for_levels(levels: np.ndarray, min_bits: int, max_bits: int) -> np.ndarray:
    """Fewest codec bits b with 2^b - 1 >= levels, clipped to [min_bits, max_bits].

    Between 8 and 32 only 16 exists, so a need above 8 bits rounds up to 16 or 32.
    """
    need = np.ceil(np.log2(np.maximum(np.asarray(levels, dtype=np.float64), 1.0) + 1.0))
    allowed = np.array([b for b in SUPPORTED_BITS if min_bits <= b <= max_bits], dtype=np.int64)
    if len(allowed) == 0:
        raise ValueError(f"no codec bit-width in [{min_bits}, {max_bits}]")
    pos = np.searchsorted(allowed, need, side="left")
    return allowed[np.minimum(pos, len(allowed) - 1)]


def levels_for_bits(bits: int) -> int:
    return 2 ** bits - 1
