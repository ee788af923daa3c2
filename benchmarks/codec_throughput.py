"""Codec throughput: encode/decode MB/s of a float32 update beside a plain memory copy.

MB are of the fp32 input (4 bytes per value).  Combined = 1 / (1/enc + 1/dec); the target is
combined >= memcpy / 10 at 2, 4 and 8 bits.  Also times what the parameter server does per
round: decode 100 payloads and accumulate them into one float32 sum.

    python benchmarks/codec_throughput.py [--numel N] [--repeat R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from statistics import median

import numpy as np
from provenance import args_config, write_json  # noqa: E402

from ssdiff_ray import codec

RESULTS = Path(__file__).resolve().parent / "results" / "codec_throughput.json"
TARGET_BITS = (2, 4, 8)


def _time(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1_100_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=100, help="payloads summed per round")
    ap.add_argument("--quick", action="store_true", help="few repeats, 10 clients (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat, args.clients = 5, 10

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(args.numel) * 1e-3).astype(np.float32)
    mb = x.nbytes / 1e6
    dst = np.empty_like(x)
    t_copy = _time(lambda: np.copyto(dst, x), args.repeat * 3)
    memcpy = mb / t_copy

    rows = []
    for bits in (2, 4, 8, 16, 32):
        enc_rng = np.random.default_rng(1)
        payload = codec.encode(x, bits, args.block_size, enc_rng)
        t_enc = _time(lambda b=bits, r=enc_rng: codec.encode(x, b, args.block_size, r), args.repeat)
        t_dec = _time(lambda p=payload: codec.decode(p, 0, x.size), args.repeat)
        enc, dec = mb / t_enc, mb / t_dec
        comb = 1.0 / (1.0 / enc + 1.0 / dec)
        rows.append({"bits": bits, "bytes": len(payload), "ratio_vs_fp32": x.nbytes / len(payload),
                     "encode_ms": t_enc * 1e3, "decode_ms": t_dec * 1e3, "encode_mb_s": enc,
                     "decode_mb_s": dec, "combined_mb_s": comb,
                     "combined_over_memcpy": comb / memcpy})

    # Server side: decode + accumulate N client payloads into a float32 sum.
    agg = {}
    for bits in (4, 8):
        payloads = [codec.encode(x, bits, args.block_size, np.random.default_rng(i))
                    for i in range(args.clients)]
        acc = np.zeros_like(x)

        def server_round(ps=payloads, acc=acc):
            acc[:] = 0.0
            for p in ps:
                np.add(acc, codec.decode(p, 0, x.size), out=acc)

        t = _time(server_round, max(3, args.repeat // 10))
        agg[bits] = {"clients": args.clients, "seconds": t,
                     "per_update_ms": t / args.clients * 1e3}

    load = os.getloadavg()[0]  # the ratio is sensitive to other jobs on a small shared box
    print(f"numel={args.numel}  block={args.block_size}  backend={codec._BACKEND}  "
          f"repeat={args.repeat}  cpus={os.cpu_count()}  loadavg(1m)={load:.2f}")
    print(f"memcpy (np.copyto): {memcpy:9.1f} MB/s  ({t_copy * 1e3:.3f} ms)")
    print(f"{'bits':>4} {'bytes':>9} {'x smaller':>9} {'enc ms':>7} {'dec ms':>7} "
          f"{'enc MB/s':>9} {'dec MB/s':>9} {'comb MB/s':>9} {'comb/memcpy':>11}")
    for r in rows:
        print(f"{r['bits']:>4} {r['bytes']:>9} {r['ratio_vs_fp32']:>9.2f} {r['encode_ms']:>7.3f} "
              f"{r['decode_ms']:>7.3f} {r['encode_mb_s']:>9.1f} {r['decode_mb_s']:>9.1f} "
              f"{r['combined_mb_s']:>9.1f} {r['combined_over_memcpy']:>11.3f}")
    for bits, a in agg.items():
        print(f"server: decode+accumulate {a['clients']} x {bits}-bit updates: "
              f"{a['seconds'] * 1e3:.1f} ms ({a['per_update_ms']:.3f} ms/update)")
    ok = all(r["combined_over_memcpy"] >= 0.1 for r in rows if r["bits"] in TARGET_BITS)
    print(f"target (combined >= memcpy/10 at bits {TARGET_BITS}): {'met' if ok else 'NOT met'}")

    result = {"numel": args.numel, "block_size": args.block_size, "repeat": args.repeat,
              "backend": codec._BACKEND, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "loadavg_1m": load, "memcpy_mb_s": memcpy, "memcpy_ms": t_copy * 1e3,
              "rows": rows, "server_decode_accumulate": {str(k): v for k, v in agg.items()},
              "target_met": ok}
    write_json(args.out, result, args_config(args))
    return result


if __name__ == "__main__":
    main()
