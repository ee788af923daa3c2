"""Parameter-server core without Ray: decode, reject malformed payloads, weighted FedAvg."""

import numpy as np

from actors.client_pool import ClientPool
from actors.parameter_server import ParameterServer
from ssdiff_ray import codec, config
from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.data.shards import write_shards
from ssdiff_ray.data.split import dirichlet_split
from ssdiff_ray.round_results import TrainedChunk

TINY = ["model.preset=tiny", "model.timesteps=50", "train.batch_size=4", "quant.block_size=64"]


def _pack(payloads):
    sizes = np.array([len(p) for p in payloads])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = len(payloads)
    z = np.zeros(n)
    chunk = TrainedChunk(np.arange(n), z, z, sizes, offsets, z, z, pid=0,
                         failed_reason=np.full(n, "", dtype=object))
    return chunk, np.frombuffer(b"".join(payloads), dtype=np.uint8)


def test_accumulate_rejects_malformed_and_averages_the_rest():
    cfg = config.load(None, TINY)
    s = ParameterServer(cfg, num_slots=2)
    d = s.num_params
    rng = np.random.default_rng(0)
    deltas = [rng.normal(scale=1e-3, size=d).astype(np.float32) for _ in range(4)]
    good = [codec.encode(x, 32, 64, rng, s.layout) for x in deltas]
    truncated = good[1][:-10]
    wrong_layout = codec.encode(deltas[2], 32, 64, rng, s.layout ^ 1)
    # encode refuses NaN input, so forge a payload whose first value is NaN
    forged = bytearray(good[3])
    forged[codec.HEADER_SIZE:codec.HEADER_SIZE + 4] = np.float32(np.nan).tobytes()
    w0 = s.weights.copy()
    s.begin_round()
    meta, blob = _pack([good[0], truncated, wrong_layout, bytes(forged)])
    v = s.accumulate(0, meta, blob, np.array([1.0, 2.0, 3.0, 4.0]), np.full(4, 32))
    assert list(v.rejected_reason) == ["", "truncated", "layout_mismatch", "checksum_mismatch"]
    meta, blob = _pack([good[2]])
    s.accumulate(1, meta, blob, np.array([3.0]), np.array([32]))
    outcome = s.finish_round()
    assert outcome.aggregated == 2
    expected = w0 + (1.0 * deltas[0] + 3.0 * deltas[2]) / 4.0
    np.testing.assert_allclose(s.weights, expected, rtol=1e-5, atol=1e-7)


def test_client_pool_payloads_decode_to_their_updates(tmp_path):
    cfg = config.load(None, [*TINY, "quant.error_feedback=true"])
    x, y = load_digits(16)
    split = dirichlet_split(y, 3, 0.5, 0)
    write_shards(x, y, split, tmp_path)
    group = ClientPool(cfg, tmp_path)
    server = ParameterServer(cfg, 1)
    flat = server.weights
    meta, blob = group.train_round(flat, 1, np.array([0, 1, 2]), np.array([32, 4, 2]),
                                   np.array([2, 2, 2]))
    assert (meta.uplink_bytes == [codec.encoded_size(len(flat), b, 64) for b in (32, 4, 2)]).all()
    assert meta.uplink_bytes[1] < meta.uplink_bytes[0] / 7  # 4 bits + a scale per 64
    assert np.isfinite(meta.loss).all() and (meta.update_norm > 0).all()
    # error feedback: residual kept for the quantized clients only
    assert list(group.residuals) == [1, 2]
    # the 32-bit payload is the exact update; same seed -> same update again
    d0 = codec.decode(blob[meta.offsets[0]:meta.offsets[1]].tobytes(), group.layout, len(flat))
    meta2, blob2 = group.train_round(flat, 1, np.array([0]), np.array([32]), np.array([2]))
    assert np.array_equal(blob2, blob[:meta.offsets[1]])
    assert abs(np.linalg.norm(d0) - meta.update_norm[0]) < 1e-5 * meta.update_norm[0] + 1e-9


def test_ema_of_global_weights_is_what_samples_and_checkpoints():
    cfg = config.load(None, [*TINY, "server.ema_decay=0.5"])
    s = ParameterServer(cfg, num_slots=1)
    rng = np.random.default_rng(1)
    w0 = s.weights.copy()
    history = []
    for _ in range(3):
        delta = rng.normal(scale=1e-2, size=s.num_params).astype(np.float32)
        s.begin_round()
        meta, blob = _pack([codec.encode(delta, 32, 64, rng, s.layout)])
        s.accumulate(0, meta, blob, np.array([1.0]), np.array([32]))
        s.finish_round()
        history.append(s.weights.copy())
    # ema starts at the first round's weights, then ema <- 0.5 ema + 0.5 w
    expected = 0.5 * (0.5 * history[0] + 0.5 * history[1]) + 0.5 * history[2]
    np.testing.assert_allclose(s.sampling_weights(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(s.sampling_weights(), s.weights) and not np.allclose(w0, s.weights)
    restored = ParameterServer(cfg, num_slots=1)
    restored.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(restored.sampling_weights(), s.sampling_weights())


def _forge(payload: bytes, value: float, at: int = 0) -> bytes:
    """A well-formed 32-bit payload whose value ``at`` is ``value``: the checksum is
    recomputed, so only the decoded values are wrong."""
    raw = bytearray(payload)
    start = codec.HEADER_SIZE + 4 * at
    raw[start:start + 4] = np.float32(value).tobytes()
    arr = np.frombuffer(bytes(raw), np.uint8)
    check = codec._checksum(arr[:codec.HEADER_SIZE - 8], arr[codec.HEADER_SIZE:])
    raw[codec.HEADER_SIZE - 8:codec.HEADER_SIZE] = int(check).to_bytes(8, "little")
    return bytes(raw)


def test_well_formed_payload_with_nan_or_inf_is_rejected_as_non_finite():
    cfg = config.load(None, TINY)
    s = ParameterServer(cfg, num_slots=1)
    rng = np.random.default_rng(0)
    delta = rng.normal(scale=1e-3, size=s.num_params).astype(np.float32)
    good = codec.encode(delta, 32, 64, rng, s.layout)
    s.begin_round()
    meta, blob = _pack([_forge(good, np.nan, 5), _forge(good, np.inf, 7), good])
    v = s.accumulate(0, meta, blob, np.ones(3), np.full(3, 32))
    assert list(v.rejected_reason) == ["non_finite", "non_finite", ""]
    assert s.finish_round().aggregated == 1


def test_payload_at_other_bits_than_assigned_is_rejected_and_its_bits_recorded():
    cfg = config.load(None, TINY)
    s = ParameterServer(cfg, num_slots=1)
    rng = np.random.default_rng(0)
    delta = rng.normal(scale=1e-3, size=s.num_params).astype(np.float32)
    s.begin_round()
    meta, blob = _pack([codec.encode(delta, 32, 64, rng, s.layout),
                        codec.encode(delta, 2, 64, rng, s.layout)])
    v = s.accumulate(0, meta, blob, np.ones(2), np.array([2, 2]))  # both were assigned 2 bits
    assert list(v.rejected_reason) == ["bits_mismatch", ""] and list(v.sent_bits) == [32, 2]
    assert s.finish_round().aggregated == 1
