"""The quantization codec: unbiasedness, variance formulas, packing, sizes, wire-format checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssdiff_ray import codec
from ssdiff_ray.codec import (
    FORMAT_VERSION,
    HEADER_SIZE,
    SUPPORTED_BITS,
    PayloadError,
    decode,
    encode,
    encode_into,
    encoded_size,
    layout_id,
    quantization_variance,
    quantize_with_feedback,
    variance_bound,
)

LOW_BITS = tuple(range(1, 9))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HAS_NUMBA = codec._numba is not None


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    """Run a test with the Numba kernels and with the NumPy reference."""
    if request.param == "numba" and not HAS_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(codec, "_BACKEND", request.param)
    return request.param


def _x(d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, d)).astype(np.float32)  # blocks with varied scales
    return x


def _per_value_variance(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """D^2 f (1-f) per value, written independently of the codec."""
    s = 2**bits - 1
    xd = x.astype(np.float64)
    out = np.zeros_like(xd)
    for lo in range(0, x.size, block):
        seg = xd[lo : lo + block]
        scale = np.abs(seg).max()
        if scale == 0:
            continue
        delta = 2 * scale / s
        u = (seg + scale) / delta
        f = u - np.floor(u)
        out[lo : lo + block] = delta**2 * f * (1 - f)
    return out


def _per_value_variance_bf16(x: np.ndarray) -> np.ndarray:
    """ulp^2 f (1-f) per value: rounding of the low 16 bits of the float32 pattern."""
    out = np.zeros(x.size)
    for i, v in enumerate(x.astype(np.float32).view(np.uint32).tolist()):
        lo = np.uint32(v & 0xFFFF0000).view(np.float32)
        hi = np.uint32((v & 0xFFFF0000) + 0x10000).view(np.float32)
        f = (v & 0xFFFF) / 65536
        out[i] = (float(hi) - float(lo)) ** 2 * f * (1 - f)
    return out


def _reseal(buf: bytearray) -> bytes:
    """Recompute the checksum of an edited payload, to reach the checks behind it."""
    raw = np.frombuffer(bytes(buf), np.uint8)
    buf[HEADER_SIZE - 8 : HEADER_SIZE] = codec._checksum(raw[: HEADER_SIZE - 8],
                                                         raw[HEADER_SIZE:]).to_bytes(8, "little")
    return bytes(buf)


# ---------------------------------------------------------------------------------------------
# Statistics: unbiasedness and variance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_unbiased(bits):
    d, block, n = 300, 32, 1500
    x = _x(d, bits)
    x[40:48] = 0.0  # a whole zero block piece and exact zeros
    total = np.zeros(d, np.float64)
    for seed in range(n):
        total += decode(encode(x, bits, block, np.random.default_rng(seed)))
    mean = total / n
    var = _per_value_variance(x, bits, block) if bits <= 8 else _per_value_variance_bf16(x)
    assert var.sum() == pytest.approx(quantization_variance(x, bits, block), rel=1e-9)
    exact = var == 0
    assert np.array_equal(mean[exact], x[exact].astype(np.float64))
    z = (mean[~exact] - x[~exact]) / np.sqrt(var[~exact] / n)
    # z ~ N(0, 1) per value if unbiased and the variance formula is right.
    assert np.abs(z).max() < 5.5
    assert 0.75 < np.mean(z**2) < 1.3


@pytest.mark.parametrize("bits", [*LOW_BITS, 16])
def test_empirical_variance_matches_formula_and_bound(bits):
    d, block, n = 2000, 128, 300
    x = _x(d, 100 + bits)
    expected = quantization_variance(x, bits, block)
    if bits <= 8:
        assert expected == pytest.approx(_per_value_variance(x, bits, block).sum(), rel=1e-9)
    errs = [np.sum((decode(encode(x, bits, block, np.random.default_rng(s))) - x)
                   .astype(np.float64) ** 2) for s in range(n)]
    assert np.mean(errs) == pytest.approx(expected, rel=0.05)
    assert expected <= variance_bound(float(np.sum(x.astype(np.float64) ** 2)), d, bits, block)


@pytest.mark.parametrize("bits", LOW_BITS)
def test_variance_bound_is_attained_and_holds(bits):
    block = 64
    x = np.zeros(block, np.float32)
    x[3] = 2.5  # (S, 0, ..., 0): every 0 sits on a grid midpoint
    bound = variance_bound(2.5**2, block, bits, block)
    assert quantization_variance(x, bits, block) == pytest.approx(bound, rel=1e-6)
    rng = np.random.default_rng(bits)
    for _ in range(20):
        y = (rng.standard_normal(500) * rng.uniform(0, 1, 500) ** 4).astype(np.float32)
        sq = float(np.sum(y.astype(np.float64) ** 2))
        assert quantization_variance(y, bits, block) <= variance_bound(sq, y.size, bits, block)
    assert variance_bound(1.0, 1, bits, block) == 0.0  # a single value is its own scale


def test_variance_at_32_bits_and_edge_cases():
    x = _x(100)
    assert quantization_variance(x, 32, 64) == 0.0
    assert variance_bound(5.0, 100, 32, 64) == 0.0
    assert variance_bound(5.0, 0, 4, 64) == 0.0
    assert quantization_variance(np.zeros(0, np.float32), 4, 64) == 0.0
    # bf16: values with zero low half are exactly representable.
    exact = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert quantization_variance(exact, 16, 64) == 0.0
    assert np.array_equal(decode(encode(exact, 16, 64, np.random.default_rng(0))), exact)


# ---------------------------------------------------------------------------------------------
# Round trips, packing and sizes
# ---------------------------------------------------------------------------------------------


def test_roundtrip_32_bits_is_exact(backend):
    x = _x(1031)
    x[:4] = [0.0, -0.0, 1e-45, -3.4e38]  # subnormal, max-ish and signed zero survive bitwise
    y = decode(encode(x, 32, 256, np.random.default_rng(0), layout=5), 5, x.size)
    assert y.dtype == np.float32 and np.array_equal(y.view(np.uint32), x.view(np.uint32))
    y[0] = 1.0  # the caller owns a writable array


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("d", [1, 7, 13, 1000, 1031, 16384 + 13, 40_000])
def test_packing_roundtrip(bits, d, backend):
    """The codes recovered from the decoded values equal the reference quantizer's codes."""
    block = 100 if d > 13 else 3
    x = _x(d, d)
    payload = encode(x, bits, block, np.random.default_rng(7))
    key = np.random.default_rng(7).integers(0, 1 << 64, dtype=np.uint64)
    nb = -(-d // block)
    scales = np.frombuffer(payload, np.float32, count=nb, offset=HEADER_SIZE)
    want = codec._np_quantize(x, scales, bits, block, key)
    y = decode(payload, expected_numel=d)
    s = 2**bits - 1
    sc = np.repeat(scales, block)[:d].astype(np.float64)
    got = np.rint((y / np.where(sc > 0, sc, 1.0) * s + s) / 2)
    assert np.array_equal(got[sc > 0], want[sc > 0])
    assert len(payload) == HEADER_SIZE + 4 * nb + math.ceil(d * bits / 8)


def test_packing_reference_functions():
    rng = np.random.default_rng(0)
    for bits in LOW_BITS:
        for d in (0, 1, 7, 8, 9, 1031, 16384, 16384 + 3, 33000):
            codes = rng.integers(0, 2**bits, d).astype(np.uint8)
            packed = codec._np_pack(codes, bits)
            assert packed.size == math.ceil(d * bits / 8)
            assert np.array_equal(codec._np_unpack(packed, bits, d), codes)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("d", [0, 1, 13, 1031, 16384 + 17, 40_000])
@pytest.mark.parametrize("block", [1, 7, 256, 5000])
def test_numba_matches_numpy_reference(d, block, monkeypatch):
    x = _x(d, d + block)
    if d > 300:
        x[100:300] = 0.0
        x[:50] *= np.float32(1e-38)  # tiny and subnormal scales take the pre-scaled path
    for bits in SUPPORTED_BITS:
        out = {}
        for name in ("numba", "numpy"):
            monkeypatch.setattr(codec, "_BACKEND", name)
            p = encode(x, bits, block, np.random.default_rng(3), layout=9)
            out[name] = (p, decode(p, 9, d))
        assert out["numba"][0] == out["numpy"][0], (bits, d, block)
        assert np.array_equal(out["numba"][1], out["numpy"][1])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_encoded_size_matches(bits):
    rng = np.random.default_rng(bits)
    for d in (0, 1, 7, 8, 13, 255, 256, 257, 1000, 1031, 16385):
        for block in (1, 3, 64, 100, 256, 1024, 5000):
            if d > 1000 and block < 64:
                continue
            p = encode(_x(d), bits, block, rng)
            assert len(p) == encoded_size(d, bits, block), (d, bits, block)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_encode_into_a_blob_slice_matches_encode(bits, backend):
    # pools encode each client straight into its slice of one result blob
    xs = [_x(1000, 1), _x(517, 2)]
    sizes = [encoded_size(x.size, bits, 64) for x in xs]
    blob = np.full(sum(sizes) + 3, 0xAB, np.uint8)
    start = 0
    for i, x in enumerate(xs):
        encode_into(blob[start:start + sizes[i]], x, bits, 64, np.random.default_rng(i), layout=5)
        assert blob[start:start + sizes[i]].tobytes() == encode(x, bits, 64,
                                                                np.random.default_rng(i), layout=5)
        start += sizes[i]
    assert (blob[start:] == 0xAB).all()  # nothing written past the slices
    payload, residual = quantize_with_feedback(xs[0], None, bits, 64, np.random.default_rng(0),
                                               out=np.empty(sizes[0], np.uint8))
    assert np.array_equal(residual, xs[0] - decode(payload))
    for bad in (np.empty(sizes[0] - 1, np.uint8), np.empty(sizes[0], np.int8),
                np.empty(sizes[0] * 2, np.uint8)[::2]):
        with pytest.raises(ValueError, match="buf must be"):
            encode_into(bad, xs[0], bits, 64, np.random.default_rng(0))


def test_compression_ratio_of_a_large_update():
    d = 1_100_000
    x = _x(d)
    raw = encoded_size(d, 32, 256)
    p4 = encode(x, 4, 256, np.random.default_rng(0))
    p8 = encode(x, 8, 256, np.random.default_rng(0))
    assert len(p4) <= raw / 7.5 and len(p8) <= raw / 3.8
    assert len(p4) == encoded_size(d, 4, 256) and len(p8) == encoded_size(d, 8, 256)
    assert np.abs(decode(p8) - x).max() <= 2 * np.abs(x).max() / 255 * 1.0001


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_empty_and_tiny(bits, backend):
    for x in (np.zeros(0, np.float32), np.zeros(5, np.float32), np.float32([3.0])):
        y = decode(encode(x, bits, 4, np.random.default_rng(0)), expected_numel=x.size)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.array_equal(y, x)  # zeros, and a lone value (its own scale), are exact


def test_deterministic_given_rng_state():
    x = _x(5000)
    for bits in (2, 16):
        a = encode(x, bits, 64, np.random.default_rng(1))
        assert a == encode(x, bits, 64, np.random.default_rng(1))
        assert a != encode(x, bits, 64, np.random.default_rng(2))
        rng = np.random.default_rng(1)
        assert encode(x, bits, 64, rng) != encode(x, bits, 64, rng)  # the state advances


def test_encode_argument_checks():
    rng = np.random.default_rng(0)
    x = _x(10)
    for bad in (0, 9, 12, 64):
        with pytest.raises(ValueError):
            encode(x, bad, 64, rng)
    with pytest.raises(ValueError):
        encode(x, 4, 0, rng)
    with pytest.raises(ValueError):
        encode(x.reshape(2, 5), 4, 64, rng)
    with pytest.raises(ValueError):
        encode(x, 4, 64, rng, layout=-1)
    for bits in SUPPORTED_BITS:
        for bad_value in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[3] = bad_value
            with pytest.raises(ValueError):
                encode(y, bits, 4, rng)
    with pytest.raises(ValueError, match="bfloat16"):
        encode(np.float32([3.4e38]), 16, 4, rng)
    y = decode(encode(x.astype(np.float64), 8, 4, rng))  # other float dtypes are converted
    assert y.dtype == np.float32
    with pytest.raises(ValueError):
        encoded_size(-1, 4, 64)


def test_layout_id_is_stable_and_discriminating():
    shapes = [("unet.conv.weight", (64, 3, 3, 3)), ("unet.conv.bias", (64,))]
    lid = layout_id(shapes)
    assert lid == 0xB132322C5AA64C4F  # fixed across processes and Python versions
    assert 0 <= lid < 2**64
    assert layout_id(shapes[::-1]) != lid
    assert layout_id([("unet.conv.weight", (64, 3, 9)), ("unet.conv.bias", (64,))]) != lid
    assert layout_id([("unet.conv.weigh", (64, 3, 3, 3)), ("unet.conv.bias", (64,))]) != lid


# ---------------------------------------------------------------------------------------------
# Malformed payloads
# ---------------------------------------------------------------------------------------------


def _expect(reason: str, payload, **kw) -> None:
    with pytest.raises(PayloadError) as e:
        decode(payload, **kw)
    assert e.value.reason == reason and isinstance(e.value, ValueError)


def test_payload_error_pickles_with_its_reason():
    import pickle

    e = pickle.loads(pickle.dumps(PayloadError("truncated", "3 bytes")))
    assert isinstance(e, PayloadError) and e.reason == "truncated" and str(e) == "truncated: 3 bytes"


def test_each_malformation_is_rejected_with_its_reason(backend):
    x = _x(1000)
    p = encode(x, 4, 64, np.random.default_rng(0), layout=42)
    assert np.array_equal(decode(memoryview(p), 42, 1000), decode(bytearray(p)))

    _expect("truncated", p[:10])
    _expect("truncated", p[:-1])
    _expect("truncated", b"")
    _expect("oversized", p + b"\0")
    _expect("bad_magic", b"XSQC" + p[4:])
    _expect("unknown_version", p[:4] + bytes([FORMAT_VERSION + 1]) + p[5:])
    _expect("unknown_bits", p[:5] + bytes([9]) + p[6:])
    _expect("unknown_bits", p[:5] + bytes([0]) + p[6:])
    _expect("bad_header", p[:6] + b"\1" + p[7:])
    _expect("bad_header", p[:8] + b"\0\0\0\0" + p[12:])  # block size 0
    _expect("layout_mismatch", p, expected_layout=43)
    _expect("numel_mismatch", p, expected_numel=999)
    flipped = bytearray(p)
    flipped[HEADER_SIZE + 300] ^= 0x10
    _expect("checksum_mismatch", bytes(flipped))
    flipped = bytearray(p)
    flipped[16] ^= 1  # the layout id is covered by the checksum too
    _expect("checksum_mismatch", bytes(flipped))

    for value, reason in ((np.nan, "non_finite"), (np.inf, "non_finite"), (-1.0, "bad_scale")):
        bad = bytearray(p)
        bad[HEADER_SIZE + 8 : HEADER_SIZE + 12] = np.float32(value).tobytes()  # scale of block 2
        _expect(reason, _reseal(bad))
    for bits, nbytes in ((32, 4), (16, 2)):
        q = bytearray(encode(x, bits, 64, np.random.default_rng(0)))
        q[HEADER_SIZE + 20 : HEADER_SIZE + 20 + nbytes] = np.float32(np.inf).tobytes()[-nbytes:]
        _expect("non_finite", _reseal(q))


# ---------------------------------------------------------------------------------------------
# Fuzzing: decode raises PayloadError and nothing else
# ---------------------------------------------------------------------------------------------


def _decode_or_payload_error(data: bytes, **kw) -> np.ndarray | None:
    try:
        y = decode(data, **kw)
    except PayloadError:
        return None
    assert y.dtype == np.float32 and y.ndim == 1 and np.isfinite(y).all()
    return y


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    assert _decode_or_payload_error(data) is None
    assert _decode_or_payload_error(b"SSQC" + bytes([FORMAT_VERSION]) + data) is None


@FUZZ
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    block=st.integers(1, 70),
    numel=st.integers(0, 300),
    body_seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_random_bodies_with_valid_headers(bits, block, numel, body_seed):
    """Arbitrary body bytes under a valid, resealed header decode or raise PayloadError."""
    body = np.random.default_rng(body_seed).bytes(codec._body_size(numel, bits, block))
    header = codec._HEADER.pack(b"SSQC", FORMAT_VERSION, bits, 0, block, 0, 7, numel, 0)
    y = _decode_or_payload_error(_reseal(bytearray(header + body)), expected_numel=numel)
    assert y is None or y.size == numel


_VALID = {bits: encode(_x(203, bits), bits, 16, np.random.default_rng(bits), layout=3)
          for bits in SUPPORTED_BITS}


@FUZZ
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    flips=st.lists(st.integers(0, 10**9), min_size=1, max_size=4, unique=True),
)
def test_fuzz_bit_flips_are_always_caught(bits, flips):
    p = bytearray(_VALID[bits])
    positions = {f % (8 * len(p)) for f in flips}
    for pos in positions:
        p[pos // 8] ^= 1 << (pos % 8)
    assert _decode_or_payload_error(bytes(p)) is None
    assert _decode_or_payload_error(bytes(p), expected_layout=3, expected_numel=203) is None


@FUZZ
@given(bits=st.sampled_from(SUPPORTED_BITS), cut=st.integers(0, 10**6), extra=st.binary(max_size=9))
def test_fuzz_truncation_and_extension(bits, cut, extra):
    p = _VALID[bits]
    assert _decode_or_payload_error(p[: cut % len(p)]) is None
    if extra:
        assert _decode_or_payload_error(p + extra) is None


# ---------------------------------------------------------------------------------------------
# Error feedback
# ---------------------------------------------------------------------------------------------


def test_error_feedback_residual_is_exact():
    u = _x(3000)
    r = _x(3000, 1) * np.float32(0.1)
    payload, new_r = quantize_with_feedback(u, r, 2, 128, np.random.default_rng(0), layout=11)
    v = u + r
    assert np.array_equal(new_r, v - decode(payload, 11, 3000))
    p0, r0 = quantize_with_feedback(u, None, 2, 128, np.random.default_rng(0))
    assert np.array_equal(r0, u - decode(p0))
    _, r32 = quantize_with_feedback(u, r, 32, 128, np.random.default_rng(0))
    assert not r32.any()
    with pytest.raises(ValueError):
        quantize_with_feedback(u, r[:-1], 2, 128, np.random.default_rng(0))


@pytest.mark.parametrize("bits", [2, 4])
def test_error_feedback_keeps_running_sums_together(bits):
    # Not 1 bit: there the unbiased quantizer's error exceeds ||v|| (omega ~ 5 on Gaussian
    # blocks), EF is not a contraction and the residual grows geometrically (see codec docs).
    d, block, rounds = 2000, 64, 150
    rng = np.random.default_rng(5)
    bias = rng.standard_normal(d).astype(np.float32) * np.float32(0.2)  # a persistent direction
    sum_u = np.zeros(d, np.float64)
    sum_ef = np.zeros(d, np.float64)
    sum_plain = np.zeros(d, np.float64)
    residual = None
    drift = []
    for _ in range(rounds):
        u = bias + rng.standard_normal(d).astype(np.float32)
        payload, residual = quantize_with_feedback(u, residual, bits, block, rng)
        y = decode(payload)
        # residual bound: Q(v) is one of the two grid points around v
        v = y + residual
        scales = np.repeat(np.abs(np.pad(v, (0, -d % block))).reshape(-1, block).max(1), block)
        assert np.all(np.abs(residual) <= 2 * scales[:d] / (2**bits - 1) * (1 + 1e-5))
        sum_u += u
        sum_ef += y
        sum_plain += decode(encode(u, bits, block, rng))
        drift.append(np.linalg.norm(sum_ef - sum_u))
        # telescoping: sum of decoded payloads = sum of updates - current residual
        assert drift[-1] == pytest.approx(np.linalg.norm(residual), rel=1e-3, abs=1e-3)
    # bounded: no growth over time, unlike plain quantization whose error is a random walk
    assert max(drift[rounds // 2 :]) < 2.5 * max(drift[: rounds // 2])
    assert drift[-1] < np.linalg.norm(sum_plain - sum_u) / 3
