"""Stochastic, unbiased block quantization of flat float32 updates into a versioned wire format.

(Over 400 lines on purpose: one wire format with its NumPy reference path and its fused
Numba kernels side by side, so that a reader checks the format against both and the tests
check that both give the same bytes. The Numba kernels are long single loops for speed.)

Core module: needs NumPy only.  When Numba is installed the same algorithm runs as fused
single-threaded kernels, ~50-100x faster and bit-identical (set SSDIFF_CODEC_BACKEND=numpy to
force the reference path).  Never imports ray or optuna.

Scheme for ``bits`` = b in 1..8 (QSGD-style, per block)
    A block of ``block_size`` consecutive values has scale S = max|x| (stored as float32).
    The grid has 2^b levels, ``s = 2^b - 1`` intervals of width D = 2S/s over [-S, S]:
    code k decodes to S * (2k - s)/s.  With u = (x + S)/D and f = u - floor(u), the code is
    floor(u) + 1 with probability f, else floor(u).  Hence E[Q(x)] = x and, per value,

        Var[Q(x)] = D^2 * f * (1 - f),   D = 2S / (2^b - 1)          (quantization_variance)

    Worst case given only ||x||^2 (``variance_bound``): each value costs at most D^2/4 = S^2/s^2
    and the value equal to +-S costs 0, so a block of n values costs <= (n-1) S^2/s^2 and

        E||Q(x) - x||^2 <= (min(block_size, numel) - 1) * ||x||^2 / (2^b - 1)^2,

    which is attained (x = (S, 0, ..., 0): 0 is a midpoint of the grid because s is odd).

Packing: codes are bit-packed, d values in ceil(d*b/8) bytes, chunk by chunk (16384 values,
    ceil(n*b/8) bytes for a chunk of n values, so chunks start on byte boundaries).  b = 8: one
    byte per value.  b in {1, 2, 4} (k = 8/b codes per byte, P = ceil(n/k) bytes): byte j holds
    the codes of values j, j+P, ..., j+(k-1)P of the chunk at bit offsets 0, b, 2b, ... (planar,
    so packing is plain SIMD).  b in {3, 5, 6, 7}: LSB-first bit stream, value i of the chunk at
    bits [i*b, (i+1)*b).  Padding bits are 0.

``bits`` = 16: bfloat16 (the upper half of the float32 bit pattern) with stochastic rounding:
    a uniform 16-bit random number is added to the lower 16 bits before truncation, so a value
    rounds away from zero with probability (lower 16 bits)/2^16 -- exactly unbiased, with
    Var = ulp^2 f (1-f), ulp = bf16 spacing at |x| <= |x| * 2^-7.  bf16 keeps float32's range,
    so large updates cannot overflow as they could in float16.
    Bound: ||x||^2 * 2^-16 + numel * 2^-268 (the second term covers subnormals, spacing 2^-133).
``bits`` = 32: raw little-endian float32, lossless.

Randomness: one u64 key is drawn from the caller's ``np.random.Generator`` per call (none at 32
bits), so the output is deterministic given the generator state.  Each chunk of 16384 values
gets 32 xorshift128+ lanes seeded by splitmix64(key, chunk, lane); every lane step yields two
24-bit uniforms (bits 40..63 and 16..39).  Arithmetic is float32 throughout, so "unbiased"
holds up to float32 rounding of x * (s / 2S) and of the levels (~2^-24 relative to S).

Wire format (little-endian)::

    header (40 bytes): magic b"SSQC" | version u8 | bits u8 | reserved u16 (0) | block u32 |
                       reserved u32 (0) | layout u64 | numel u64 | checksum u64
    body: bits 1..8: scales float32[ceil(numel/block)] then packed codes ceil(numel*b/8) bytes
          bits 16: uint16[numel] (bf16);  bits 32: float32[numel]

The checksum covers header bytes 0..31 and the body.  It is not zlib.crc32 (~2.5 GB/s here:
0.4 ms per 8-bit 1.1M-value payload on each side, a third of the time budget) but a
Fletcher-style sum (~20 GB/s) over little-endian u64 words in 4 interleaved lanes,
A_l = sum w, B_l = sum (T - t) w, folded with odd/even multipliers so that any error confined
to one 64-bit word (in particular any single bit flip) is always detected, then mixed.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
FORMAT_VERSION: int = 1

_MAGIC = b"SSQC"
_HEADER = struct.Struct("<4sBBHIIQQQ")
HEADER_SIZE: int = _HEADER.size  # 40
_SUM_OFFSET = HEADER_SIZE - 8  # the checksum field; the bytes before it are checksummed
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

_CHUNK = 16384  # values per work item: scratch (codes, randoms) stays in L1/L2
_LANES = 32  # xorshift128+ lanes per chunk; each step fills 2 * _LANES values
_ABS = np.uint32(0x7FFFFFFF)
_EXP_MASK = 0x7F800000  # |x| bit patterns >= this are Inf or NaN
_BF16_MAX_BITS = 0x7F7F0000  # |x| above the largest finite bf16 may round up to Inf
_TINY_SCALE = np.float32(2.0**-100)  # below this s/(2S) could overflow: pre-scale the block
_PRESCALE = np.float32(2.0**64)  # a power of two, so pre-scaling is exact
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV24 = np.float32(2.0**-24)
# Checksum fold: odd multipliers for A, even ones for B (see module docstring).
_SUM_P = np.array([0x9E3779B97F4A7C15 + 2 * i for i in range(4)], np.uint64)
_SUM_Q = np.array([0xD1B54A32D192ED02 + 2 * i for i in range(4)], np.uint64)


class PayloadError(ValueError):
    """A payload that cannot be decoded; ``reason`` is a stable snake_case code.

    Reasons: truncated, oversized, bad_magic, unknown_version, unknown_bits, bad_header,
    layout_mismatch, numel_mismatch, checksum_mismatch, non_finite, bad_scale.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.detail = message

    def __reduce__(self):  # keep .reason across pickling (Ray ships exceptions between processes)
        return type(self), (self.reason, self.detail)


def layout_id(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Stable u64 identifying an ordered list of (name, shape) pairs (blake2b, not hash())."""
    h = hashlib.blake2b(digest_size=8, person=b"ssdiff-layout")
    h.update(struct.pack("<Q", len(shapes)))
    for name, shape in shapes:
        raw = name.encode("utf-8")
        dims = tuple(int(n) for n in shape)
        h.update(struct.pack(f"<QQ{len(dims)}Q", len(raw), len(dims), *dims))
        h.update(raw)
    return int.from_bytes(h.digest(), "little")


def _check_args(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not (isinstance(block_size, (int, np.integer)) and 1 <= block_size <= _U32):
        raise ValueError(f"block_size must be an int in [1, 2^32), got {block_size!r}")


def _body_size(numel: int, bits: int, block_size: int) -> int:
    if bits == 32:
        return 4 * numel
    if bits == 16:
        return 2 * numel
    return 4 * (-(-numel // block_size)) + (numel * bits + 7) // 8


def encoded_size(numel: int, bits: int, block_size: int) -> int:
    """Exact ``len(encode(x, bits, block_size, ...))`` for ``x.size == numel``, without encoding."""
    _check_args(bits, block_size)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return HEADER_SIZE + _body_size(int(numel), bits, int(block_size))


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


# ----------------------------------------------------------------------------------------------
# NumPy reference implementation (the fallback without Numba, and the tests' oracle).  The Numba
# kernels below do the same float32 operations in the same order, so both give identical bytes.
# ----------------------------------------------------------------------------------------------


def _np_mix(z: np.ndarray) -> np.ndarray:
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _np_random(key: np.uint64, d: int, nbits: int) -> np.ndarray:
    """uint32[d] of ``nbits``-bit uniforms: per chunk, 32 seeded xorshift128+ lanes."""
    nch = -(-d // _CHUNK)
    lanes = np.arange(nch * _LANES, dtype=np.uint64) * np.uint64(2)
    s0 = _np_mix((lanes + np.uint64(1)) * _GAMMA + key)
    s1 = _np_mix((lanes + np.uint64(2)) * _GAMMA + key) | np.uint64(1)
    steps = -(-min(d, _CHUNK) // (2 * _LANES))  # a lone short chunk needs only a few steps
    out = np.empty((steps, 2, nch * _LANES), np.uint32)
    mask = np.uint64((1 << nbits) - 1)
    for t in range(steps):
        a, b = s0, s1
        s0 = b
        a = a ^ (a << np.uint64(23))
        s1 = a ^ b ^ (a >> np.uint64(17)) ^ (b >> np.uint64(26))
        o = s1 + b
        out[t, 0] = o >> np.uint64(64 - nbits)
        out[t, 1] = (o >> np.uint64(16)) & mask
    # (step, half, chunk, lane) -> (chunk, step, half, lane): value j of a chunk is lane j % 32.
    out = out.reshape(steps, 2, nch, _LANES).transpose(2, 0, 1, 3)
    return out.reshape(-1)[:d]


def _np_absmax_bits(xu: np.ndarray, block: int) -> np.ndarray:
    """Per-block max of |x| as float32 bit patterns (integer order == float order for |x|,
    and NaN sorts above Inf, so one comparison with _EXP_MASK catches both)."""
    d = xu.size
    nb = -(-d // block)
    a = xu & _ABS
    full = d // block
    out = np.empty(nb, np.uint32)
    if full:
        out[:full] = a[: full * block].reshape(full, block).max(axis=1)
    if nb > full:
        out[full] = a[full * block :].max()
    return out


def _np_quantize(x: np.ndarray, scales: np.ndarray, bits: int, block: int, key) -> np.ndarray:
    """Codes (uint8) of the stochastic quantizer; see the module docstring."""
    s = np.float32((1 << bits) - 1)
    half = np.float32(0.5) * s
    pre = np.where(scales < _TINY_SCALE, _PRESCALE, np.float32(1.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        c = np.where(scales > 0, half / (scales * pre), np.float32(0.0)).astype(np.float32)
    idx = np.arange(x.size) // block
    u = (x * pre[idx]) * c[idx] + half
    m = np.floor(u)
    r = _np_random(key, x.size, 24).astype(np.float32) * _INV24
    q = m + (r < u - m).astype(np.float32)
    np.clip(q, np.float32(0.0), s, out=q)
    return q.astype(np.uint8)


def _np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference packer (layout: "Packing" in the module docstring)."""
    d = codes.size
    if bits == 8:
        return codes.copy()
    if bits in (1, 2, 4):
        k = 8 // bits  # codes per byte
        parts = []
        for lo in range(0, d, _CHUNK):
            c = codes[lo : lo + _CHUNK]
            p = -(-c.size // k)  # plane length = bytes of this chunk
            planes = np.zeros(k * p, np.uint8)
            planes[: c.size] = c
            planes = planes.reshape(k, p)
            byte = np.zeros(p, np.uint8)
            for t in range(k):
                byte |= planes[t] << np.uint8(t * bits)
            parts.append(byte)
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    g = -(-d // 8)
    padded = np.zeros(g * 8, np.uint64)
    padded[:d] = codes
    words = np.zeros(g, np.dtype("<u8"))
    for j, col in enumerate(padded.reshape(g, 8).T):
        words |= col << np.uint64(j * bits)
    return words.view(np.uint8).reshape(g, 8)[:, :bits].reshape(-1)[: (d * bits + 7) // 8].copy()


def _np_unpack(packed: np.ndarray, bits: int, d: int) -> np.ndarray:
    if bits == 8:
        return packed[:d]
    mask = np.uint8((1 << bits) - 1)
    if bits in (1, 2, 4):
        k = 8 // bits
        parts = []
        for lo in range(0, d, _CHUNK):
            n = min(_CHUNK, d - lo)
            p = -(-n // k)
            byte = packed[lo // k : lo // k + p]
            planes = [(byte >> np.uint8(t * bits)) & mask for t in range(k)]
            parts.append(np.concatenate(planes)[:n])
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    g = -(-d // 8)
    flat = np.zeros(g * bits, np.uint8)
    flat[: packed.size] = packed
    raw = np.zeros((g, 8), np.uint8)
    raw[:, :bits] = flat.reshape(g, bits)
    words = raw.reshape(-1).view(np.dtype("<u8"))
    wmask = np.uint64((1 << bits) - 1)
    cols = [(words >> np.uint64(j * bits)) & wmask for j in range(8)]
    return np.stack(cols, axis=1).reshape(-1)[:d].astype(np.uint8)


def _np_dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    s = (1 << bits) - 1
    levels = (2 * np.arange(s + 1) - s).astype(np.float32) / np.float32(s)
    return levels[codes] * scales[np.arange(codes.size) // block]


def _np_fletcher(words: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Advance the 4-lane sums (a, b) over ``words`` (u64, length a multiple of 4), in place."""
    w = words.astype(np.uint64).reshape(-1, 4)
    steps = w.shape[0]
    b += a * np.uint64(steps)
    b += ((np.uint64(steps) - np.arange(steps, dtype=np.uint64))[:, None] * w).sum(axis=0)
    a += w.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# Numba kernels: one fused pass per payload, single-threaded (parallel launches cost more than
# they save on updates of this size and are not safe from several Python threads); nogil so
# callers may run several codecs in threads.
# ----------------------------------------------------------------------------------------------

try:
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    _numba = None

_BACKEND = (
    "numba"
    if _numba is not None and os.environ.get("SSDIFF_CODEC_BACKEND", "numba") != "numpy"
    else "numpy"
)

if _numba is not None:
    _jit = _numba.njit(cache=True, nogil=True)
    _inline = _jit  # per-chunk helpers: call overhead is negligible, IR inlining is slow

    @_inline
    def _nb_mix(z):  # pragma: no cover - compiled
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))

    @_inline
    def _nb_random(key, ch, n, nbits, rnd, s0, s1):  # pragma: no cover - compiled
        """Fill rnd[:n] (rounded up to a lane step) as _np_random does for chunk ``ch``."""
        for lane in range(_LANES):
            c = np.uint64((ch * _LANES + lane) * 2)
            s0[lane] = _nb_mix((c + np.uint64(1)) * _GAMMA + key)
            s1[lane] = _nb_mix((c + np.uint64(2)) * _GAMMA + key) | np.uint64(1)
        hi_shift = np.uint64(64 - nbits)
        mask = np.uint64((1 << nbits) - 1)
        for t in range((n + 2 * _LANES - 1) // (2 * _LANES)):
            base = t * 2 * _LANES
            for lane in range(_LANES):
                a = s0[lane]
                b = s1[lane]
                s0[lane] = b
                a = a ^ (a << np.uint64(23))
                a = a ^ b ^ (a >> np.uint64(17)) ^ (b >> np.uint64(26))
                s1[lane] = a
                o = a + b
                rnd[base + lane] = np.uint32(o >> hi_shift)
                rnd[base + _LANES + lane] = np.uint32((o >> np.uint64(16)) & mask)

    @_inline
    def _nb_absmax(xu, lo, hi):  # pragma: no cover - compiled
        """max |x| bit pattern over xu[lo:hi]; shifting the sign bit out (rather than masking
        it) is what lets LLVM vectorise the reduction (3x faster)."""
        seg = xu[lo:hi]
        m = np.uint32(0)
        for i in range(seg.size):
            v = np.uint32(seg[i] << np.uint32(1))
            m = v if v > m else m  # noqa: FURB136 - max() does not vectorise here
        return m >> np.uint32(1)

    @_jit
    def _nb_absmax_bits(xu):  # pragma: no cover - compiled
        return _nb_absmax(xu, 0, xu.size)

    @_inline
    def _nb_pack(codes, n, bits, out, boff):  # pragma: no cover - compiled
        """Bit-pack codes[:n] (one chunk) into out[boff:]; codes[n:] must be 0."""
        if bits == 8:
            dst = out[boff : boff + n]
            for i in range(n):
                dst[i] = codes[i]
        elif bits == 4:
            p = (n + 1) // 2
            dst = out[boff : boff + p]
            c0 = codes[:p]
            c1 = codes[p : 2 * p]
            for i in range(p):
                dst[i] = c0[i] | (c1[i] << np.uint8(4))
        elif bits == 2:
            p = (n + 3) // 4
            dst = out[boff : boff + p]
            c0 = codes[:p]
            c1 = codes[p : 2 * p]
            c2 = codes[2 * p : 3 * p]
            c3 = codes[3 * p : 4 * p]
            for i in range(p):
                dst[i] = (c0[i] | (c1[i] << np.uint8(2)) | (c2[i] << np.uint8(4))
                          | (c3[i] << np.uint8(6)))
        elif bits == 1:
            p = (n + 7) // 8
            dst = out[boff : boff + p]
            for i in range(p):
                dst[i] = 0
            for t in range(8):
                ct = codes[t * p : (t + 1) * p]
                sh = np.uint8(t)
                for i in range(p):
                    dst[i] |= ct[i] << sh
        else:
            nbytes = out.size
            for g in range((n + 7) // 8):
                w = np.uint64(0)
                for j in range(8):
                    w |= np.uint64(codes[8 * g + j]) << np.uint64(j * bits)
                o = boff + g * bits
                for t in range(min(bits, nbytes - o)):
                    out[o + t] = np.uint8((w >> np.uint64(8 * t)) & np.uint64(0xFF))

    @_jit
    def _nb_encode_low(x, bits, block, key, scales, out):  # pragma: no cover - compiled
        """Scales (as |x| bit patterns, written to ``scales``) and packed codes of x."""
        xu = x.view(np.uint32)
        sbits = scales.view(np.uint32)
        d = x.size
        s = np.float32((1 << bits) - 1)
        half = np.float32(0.5) * s
        zero = np.float32(0.0)
        one = np.float32(1.0)
        codes = np.zeros(_CHUNK, np.uint8)
        rnd = np.empty(_CHUNK, np.uint32)
        s0 = np.empty(_LANES, np.uint64)
        s1 = np.empty(_LANES, np.uint64)
        kdone = 0  # blocks whose scale is known (a block may start in an earlier chunk)
        for ch in range((d + _CHUNK - 1) // _CHUNK):
            lo = ch * _CHUNK
            hi = min(lo + _CHUNK, d)
            n = hi - lo
            while kdone * block < hi:
                sbits[kdone] = _nb_absmax(xu, kdone * block, min((kdone + 1) * block, d))
                kdone += 1
            _nb_random(key, ch, n, 24, rnd, s0, s1)
            if n < _CHUNK:
                codes[:] = 0  # the packers read whole groups of 8
            i = lo
            while i < hi:
                k = i // block
                bend = min((k + 1) * block, hi)
                sc = scales[k]
                xs = x[i:bend]
                rs = rnd[i - lo : bend - lo]
                cs = codes[i - lo : bend - lo]
                if sc >= _TINY_SCALE:  # the common case: no pre-scaling (x * 1 would be exact)
                    c = half / sc
                    for j in range(xs.size):
                        u = xs[j] * c + half
                        m = np.floor(u)
                        r = np.float32(np.int32(rs[j])) * _INV24
                        q = m + (one if r < u - m else zero)
                        q = min(max(q, zero), s)
                        cs[j] = np.uint8(np.int32(q))
                else:
                    c = half / (sc * _PRESCALE) if sc > zero else zero
                    for j in range(xs.size):
                        u = (xs[j] * _PRESCALE) * c + half
                        m = np.floor(u)
                        r = np.float32(np.int32(rs[j])) * _INV24
                        q = m + (one if r < u - m else zero)
                        q = min(max(q, zero), s)
                        cs[j] = np.uint8(np.int32(q))
                i = bend
            _nb_pack(codes, n, bits, out, (lo * bits) // 8)

    @_jit
    def _nb_decode_low(packed, scales, bits, block, out):  # pragma: no cover - compiled
        d = out.size
        s = (1 << bits) - 1
        sf = np.float32(s)
        two = np.float32(2.0)
        mask = np.uint8(s)
        codes = np.zeros(_CHUNK + 8, np.uint8)
        nbytes = packed.size
        for ch in range((d + _CHUNK - 1) // _CHUNK):
            lo = ch * _CHUNK
            hi = min(lo + _CHUNK, d)
            n = hi - lo
            boff = (lo * bits) // 8
            if bits == 8:
                src = packed[boff : boff + n]
                for i in range(n):
                    codes[i] = src[i]
            elif bits == 4:
                p = (n + 1) // 2
                src = packed[boff : boff + p]
                c0 = codes[:p]
                c1 = codes[p : 2 * p]
                for i in range(p):
                    c0[i] = src[i] & mask
                    c1[i] = src[i] >> np.uint8(4)
            elif bits == 2:
                p = (n + 3) // 4
                src = packed[boff : boff + p]
                c0 = codes[:p]
                c1 = codes[p : 2 * p]
                c2 = codes[2 * p : 3 * p]
                c3 = codes[3 * p : 4 * p]
                for i in range(p):
                    v = src[i]
                    c0[i] = v & mask
                    c1[i] = (v >> np.uint8(2)) & mask
                    c2[i] = (v >> np.uint8(4)) & mask
                    c3[i] = v >> np.uint8(6)
            elif bits == 1:
                p = (n + 7) // 8
                src = packed[boff : boff + p]
                for t in range(8):
                    ct = codes[t * p : (t + 1) * p]
                    sh = np.uint8(t)
                    for i in range(p):
                        ct[i] = (src[i] >> sh) & mask
            else:
                wmask = np.uint64(s)
                for g in range((n + 7) // 8):
                    o = boff + g * bits
                    w = np.uint64(0)
                    for t in range(min(bits, nbytes - o)):
                        w |= np.uint64(packed[o + t]) << np.uint64(8 * t)
                    for j in range(8):
                        codes[8 * g + j] = np.uint8((w >> np.uint64(j * bits)) & wmask)
            i = lo
            while i < hi:
                k = i // block
                bend = min((k + 1) * block, hi)
                sc = scales[k]
                cs = codes[i - lo : bend - lo]
                os_ = out[i:bend]
                for j in range(cs.size):
                    # 2k - s is exact in float32; one correctly rounded division, as in NumPy
                    lv = (np.float32(cs[j]) * two - sf) / sf
                    os_[j] = lv * sc
                i = bend

    @_jit
    def _nb_bf16_encode(xu, key, out):  # pragma: no cover - compiled
        d = xu.size
        rnd = np.empty(_CHUNK, np.uint32)
        s0 = np.empty(_LANES, np.uint64)
        s1 = np.empty(_LANES, np.uint64)
        for ch in range((d + _CHUNK - 1) // _CHUNK):
            lo = ch * _CHUNK
            hi = min(lo + _CHUNK, d)
            _nb_random(key, ch, hi - lo, 16, rnd, s0, s1)
            xs = xu[lo:hi]
            os_ = out[lo:hi]
            for j in range(xs.size):
                os_[j] = np.uint16((xs[j] + rnd[j]) >> np.uint32(16))

    @_jit
    def _nb_bf16_decode(h, out):  # pragma: no cover - compiled
        m = np.uint32(0)
        for j in range(h.size):
            v = np.uint32(h[j]) << np.uint32(16)
            out[j] = v
            a = np.uint32(v << np.uint32(1))
            m = a if a > m else m  # noqa: FURB136 - see _nb_absmax
        return m >> np.uint32(1)

    @_jit
    def _nb_fletcher(w, a, b):  # pragma: no cover - compiled
        """_np_fletcher, with the lanes in registers (4 independent add chains)."""
        a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
        b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
        for t in range(w.size // 4):
            i = 4 * t
            a0 += w[i]
            a1 += w[i + 1]
            a2 += w[i + 2]
            a3 += w[i + 3]
            b0 += a0
            b1 += a1
            b2 += a2
            b3 += a3
        a[0], a[1], a[2], a[3] = a0, a1, a2, a3
        b[0], b[1], b[2], b[3] = b0, b1, b2, b3


def _fast() -> bool:
    return _BACKEND == "numba"


def _max_abs_bits(xu: np.ndarray) -> int:
    if xu.size == 0:
        return 0
    if _fast():
        return int(_nb_absmax_bits(xu))
    return int((xu & _ABS).max())


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: Numba compiles one specialisation per writability, so feeding the
    kernels one kind halves the first-use compile time."""
    v = a.view()
    v.flags.writeable = False
    return v


def _checksum(prefix: np.ndarray, body: np.ndarray) -> int:
    """Checksum of header bytes 0..31 (``prefix``) followed by ``body`` (uint8 arrays)."""
    a = np.zeros(4, np.uint64)
    b = np.zeros(4, np.uint64)
    nfull = body.size // 32 * 32
    rest = np.zeros(32, np.uint8)
    rest[: body.size - nfull] = body[nfull:]
    parts = [prefix.view("<u8"), body[:nfull].view("<u8")]
    if nfull < body.size:
        parts.append(rest.view("<u8"))
    fletcher = _nb_fletcher if _fast() else _np_fletcher
    for words in parts:
        if words.size:
            fletcher(_readonly(words), a, b)
    total = int((a * _SUM_P + b * _SUM_Q).sum(dtype=np.uint64))
    return _mix64(total)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def encode(
    x: np.ndarray, bits: int, block_size: int, rng: np.random.Generator, layout: int = 0
) -> bytes:
    """Quantize a 1-D float update to a self-describing payload (see module docstring).

    Any float dtype is converted to float32.  Deterministic given ``rng``'s state (one u64 is
    drawn unless bits == 32).  Raises ValueError for bad arguments or non-finite values.
    """
    x = np.asarray(x)
    buf = np.empty(encoded_size(x.size, bits, block_size), np.uint8)  # checks the arguments
    encode_into(buf, x, bits, block_size, rng, layout)
    return buf.tobytes()


def encode_into(
    buf: np.ndarray, x: np.ndarray, bits: int, block_size: int, rng: np.random.Generator,
    layout: int = 0,
) -> None:
    """``encode`` written straight into ``buf`` (a uint8 array of exactly
    ``encoded_size(x.size, bits, block_size)`` bytes, e.g. a slice of a pool's result blob),
    saving the two copies of returning bytes and copying them into place."""
    _check_args(bits, block_size)
    block_size = int(block_size)
    if not 0 <= layout <= _U64:
        raise ValueError(f"layout must be a u64, got {layout!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {x.shape}")
    d = x.size
    xu = x.view(np.uint32)
    size = HEADER_SIZE + _body_size(d, bits, block_size)
    if not (isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1
            and buf.size == size and buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError(f"buf must be a writable contiguous uint8 array of {size} bytes")
    body = buf[HEADER_SIZE:]

    if bits == 32:
        if _max_abs_bits(xu) >= _EXP_MASK:
            raise ValueError("x contains NaN or Inf")
        body.view(np.float32)[:] = x
    elif bits == 16:
        mx = _max_abs_bits(xu)
        if mx >= _EXP_MASK:
            raise ValueError("x contains NaN or Inf")
        if mx > _BF16_MAX_BITS:
            raise ValueError("x has values beyond the bfloat16 range")
        key = rng.integers(0, 1 << 64, dtype=np.uint64)
        out16 = body.view(np.uint16)
        if _fast():
            _nb_bf16_encode(xu, key, out16)
        else:
            r16 = _np_random(key, d, 16)
            out16[:] = ((xu + r16) >> np.uint32(16)).astype(np.uint16)
    else:
        nb = -(-d // block_size)
        scales = body[: 4 * nb].view(np.float32)
        packed = body[4 * nb :]
        key = rng.integers(0, 1 << 64, dtype=np.uint64)
        if _fast():
            if d:
                _nb_encode_low(x, bits, block_size, key, scales, packed)
        else:
            scales[:] = _np_absmax_bits(xu, block_size).view(np.float32)
        if nb and int(scales.view(np.uint32).max()) >= _EXP_MASK:
            raise ValueError("x contains NaN or Inf")
        if not _fast():
            packed[:] = _np_pack(_np_quantize(x, scales, bits, block_size, key), bits)

    _HEADER.pack_into(buf, 0, _MAGIC, FORMAT_VERSION, bits, 0, block_size, 0, layout, d, 0)
    buf[_SUM_OFFSET:HEADER_SIZE].view("<u8")[0] = _checksum(buf[:_SUM_OFFSET], body)


def decode(
    payload: bytes | memoryview,
    expected_layout: int | None = None,
    expected_numel: int | None = None,
) -> np.ndarray:
    """Validate and decode a payload into a new 1-D float32 array.

    Raises PayloadError (and nothing else) for any malformed bytes; see PayloadError.reason.
    """
    raw = _readonly(np.frombuffer(payload, np.uint8))
    bits, block, numel = _check_header(raw, expected_layout, expected_numel)
    body = raw[HEADER_SIZE:]
    if bits == 32:
        out = body.view("<f4").astype(np.float32)  # a copy the caller owns and may modify
        if _max_abs_bits(out.view(np.uint32)) >= _EXP_MASK:
            raise PayloadError("non_finite", "decoded values contain NaN/Inf")
        return out
    if bits == 16:
        h = body.view("<u2")
        if _fast():
            outu = np.empty(numel, np.uint32)
            mx = int(_nb_bf16_decode(h, outu))
        else:
            outu = h.astype(np.uint32) << np.uint32(16)
            mx = _max_abs_bits(outu)
        if mx >= _EXP_MASK:
            raise PayloadError("non_finite", "decoded values contain NaN/Inf")
        return outu.view(np.float32)

    nb = -(-numel // block)
    sbits = body[: 4 * nb].view("<u4")
    if nb and int(sbits.max()) >= _EXP_MASK:  # a negative scale (sign bit) also lands here
        if int((sbits & _ABS).max()) >= _EXP_MASK:
            raise PayloadError("non_finite", "a block scale is NaN/Inf")
        raise PayloadError("bad_scale", "a block scale is negative")
    scales = sbits.view(np.float32)
    packed = body[4 * nb :]
    if _fast():
        out = np.empty(numel, np.float32)
        _nb_decode_low(packed, scales, bits, block, out)
        return out
    return _np_dequantize(_np_unpack(packed, bits, numel), scales, bits, block)


def header_bits(payload: bytes | memoryview) -> int:
    """The bit width a payload's header declares (0 when it has no readable header)."""
    raw = np.frombuffer(payload, np.uint8)
    if raw.size < HEADER_SIZE:
        return 0
    magic, _, bits, *_ = _HEADER.unpack_from(raw)
    return int(bits) if magic == _MAGIC else 0


def _check_header(raw: np.ndarray, expected_layout: int | None,
                  expected_numel: int | None) -> tuple[int, int, int]:
    """(bits, block, numel) of a payload whose header, size and checksum are valid."""
    n = raw.size
    if n < HEADER_SIZE:
        raise PayloadError("truncated", f"{n} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, bits, res16, block, res32, layout, numel, check = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise PayloadError("bad_magic", f"{magic!r}")
    if version != FORMAT_VERSION:
        raise PayloadError("unknown_version", f"version {version}, expected {FORMAT_VERSION}")
    if bits not in SUPPORTED_BITS:
        raise PayloadError("unknown_bits", f"bits {bits}")
    if res16 or res32 or block == 0:
        raise PayloadError("bad_header", f"reserved={res16},{res32} block_size={block}")
    if expected_layout is not None and layout != expected_layout:
        raise PayloadError("layout_mismatch", f"layout {layout:#x}, expected {expected_layout:#x}")
    if expected_numel is not None and numel != expected_numel:
        raise PayloadError("numel_mismatch", f"numel {numel}, expected {expected_numel}")
    want = HEADER_SIZE + _body_size(numel, bits, block)
    if n < want:
        raise PayloadError("truncated", f"{n} bytes, the header implies {want}")
    if n > want:
        raise PayloadError("oversized", f"{n} bytes, the header implies {want}")
    if _checksum(raw[:_SUM_OFFSET], raw[HEADER_SIZE:]) != check:
        raise PayloadError("checksum_mismatch", "payload corrupted")
    return bits, block, numel


def quantization_variance(x: np.ndarray, bits: int, block_size: int) -> float:
    """Exact E||Q(x) - x||^2 of the stochastic quantizer for this x (computed in float64)."""
    _check_args(bits, block_size)
    x32 = np.ascontiguousarray(x, dtype=np.float32).ravel()
    if bits == 32 or x32.size == 0:
        return 0.0
    if bits == 16:
        xu = x32.view(np.uint32)
        lo = np.abs((xu & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64))
        hi = np.abs(((xu | np.uint32(0xFFFF)) + np.uint32(1)).view(np.float32).astype(np.float64))
        f = (xu & np.uint32(0xFFFF)).astype(np.float64) / 65536.0
        return float(np.sum((hi - lo) ** 2 * f * (1.0 - f)))
    s = (1 << bits) - 1
    xd = x32.astype(np.float64)
    smax = _np_absmax_bits(x32.view(np.uint32), block_size).view(np.float32).astype(np.float64)
    sc = smax[np.arange(xd.size) // block_size]
    nz = sc > 0
    delta = 2.0 * sc[nz] / s
    u = (xd[nz] + sc[nz]) / delta
    f = u - np.floor(u)
    return float(np.sum(delta**2 * f * (1.0 - f)))


def variance_bound(sq_norm: float, numel: int, bits: int, block_size: int) -> float:
    """Worst-case E||Q(x) - x||^2 over all x of ``numel`` values with ||x||^2 = sq_norm.

    bits 1..8: (min(block_size, numel) - 1) * sq_norm / (2^bits - 1)^2 (attained);
    bits 16: sq_norm * 2^-16 + numel * 2^-268;  bits 32: 0.
    """
    _check_args(bits, block_size)
    if bits == 32 or numel <= 0:
        return 0.0
    if bits == 16:
        return float(sq_norm) * 2.0**-16 + numel * 2.0**-268
    s = (1 << bits) - 1
    return (min(block_size, numel) - 1) * float(sq_norm) / (s * s)


def quantize_with_feedback(
    update: np.ndarray,
    residual: np.ndarray | None,
    bits: int,
    block_size: int,
    rng: np.random.Generator,
    layout: int = 0,
    out: np.ndarray | None = None,
) -> tuple[bytes | np.ndarray, np.ndarray]:
    """Error-feedback (EF-SGD) encode: v = update + residual; returns (encode(v), v - decode).
    With ``out`` the payload is written there (see ``encode_into``) and ``out`` is returned.

    Carrying the residual into the next round keeps the running sum of decoded payloads within
    one residual of the running sum of updates.  That residual stays bounded only while the
    quantizer is on average a contraction, omega = E||Q(v) - v||^2 / ||v||^2 < 1: true for
    bits >= 2 on typical (Gaussian-like) blocks of 64..1024 values, but not at 1 bit, where
    omega ~ 5 and the residual grows geometrically (Q is unbiased, not contractive; EF theory
    assumes a contractive compressor).  Policies should not combine EF with 1 bit.
    """
    v = np.asarray(update, dtype=np.float32).ravel()
    if residual is not None:
        residual = np.asarray(residual, dtype=np.float32).ravel()
        if residual.shape != v.shape:
            raise ValueError(f"residual shape {residual.shape} != update shape {v.shape}")
        v = v + residual
    if out is None:
        payload = encode(v, bits, block_size, rng, layout)
    else:
        encode_into(out, v, bits, block_size, rng, layout)
        payload = out
    return payload, v - decode(payload)
