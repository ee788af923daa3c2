"""``ssdiff loadtest URL``: closed-loop HTTP load on a running service (aiohttp).

At each concurrency C, C workers each loop "send a request, wait for its answer" until
``requests`` answers have come back in all; latency is per request, requests/s is answers
over the level's wall time. Errors (non-2xx, time-outs, refused connections) are counted,
never retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


async def _level(url: str, body: bytes, concurrency: int, requests: int, timeout_s: float) -> dict:
    import aiohttp

    latencies, errors, statuses = [], 0, {}
    left = requests
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def worker():
            nonlocal left, errors
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body,
                                            headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        status = r.status
                except (TimeoutError, aiohttp.ClientError) as e:
                    status = type(e).__name__
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies),
            "errors": errors, "statuses": json.dumps({str(k): v for k, v in statuses.items()}),
            "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99)), "mean_s": float(lat.mean())}


def loadtest(url: str, concurrency: list[int], requests: int, body: dict | None = None,
             timeout_s: float = 120.0, warmup: int = 2) -> pd.DataFrame:
    """One row per concurrency level (after ``warmup`` unrecorded requests)."""
    url = url.rstrip("/")
    if not url.endswith("/generate"):
        url += "/generate"
    payload = json.dumps(body or {"n": 1}).encode()
    if warmup:
        asyncio.run(_level(url, payload, 1, warmup, timeout_s))
    return pd.DataFrame([asyncio.run(_level(url, payload, c, requests, timeout_s))
                         for c in concurrency])


def save(table: pd.DataFrame, out: str | Path) -> list[str]:
    """``out``.parquet and ``out``.json."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out.with_suffix(".parquet"), index=False)
    out.with_suffix(".json").write_text(table.to_json(orient="records", indent=1))
    return [str(out.with_suffix(".parquet")), str(out.with_suffix(".json"))]
