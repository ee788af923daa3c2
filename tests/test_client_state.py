"""The per-client state store (bounded RAM, spill to disk) and the run directory's
incremental copy of it: exact values back, bounded memory, every bad file refused."""

import sqlite3
import subprocess

import numpy as np
import pytest
from conftest import TINY

from actors.client_pool import ClientPool
from actors.parameter_server import ParameterServer
from ssdiff_ray import config
from ssdiff_ray.client_state import ClientStateError, ClientStateStore
from ssdiff_ray.client_state_file import FILE, ClientStateFile
from ssdiff_ray.data.shards import write_shards
from ssdiff_ray.data.split import dirichlet_split

SIZE = 1000


def _values(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=SIZE).astype(np.float32) for c in range(n)}


def test_store_keeps_ram_bounded_and_gives_back_exact_values(tmp_path):
    cap = 10 * SIZE * 4  # ten entries
    store = ClientStateStore(SIZE, cap, spill_dir=tmp_path)
    values = _values(100)
    for c, v in values.items():
        store.put(c, v, round_=1 + c // 50)
        assert store.ram_bytes() <= cap
    stats = store.stats()
    assert (stats["entries"], stats["in_ram"], stats["on_disk"]) == (100, 10, 90)
    assert stats["disk_bytes"] >= 90 * SIZE * 4
    for c, v in values.items():  # spilled or not, the same float32 values
        assert np.array_equal(store.get(c), v)
    assert store.get(100) is None and 100 not in store
    # only what round 2 wrote (clients 50..99), from RAM and disk alike
    changed = list(store.changed_since(1))
    assert [c for c, _, _ in changed] == list(range(50, 100))
    assert all(r == 2 and np.array_equal(v, values[c]) for c, r, v in changed)
    # an update replaces the spilled value
    store.put(3, -values[3], round_=3)
    assert np.array_equal(store.get(3), -values[3])
    assert [c for c, _, _ in store.changed_since(2)] == [3]
    assert [c for c, _, _ in store.changed_since(1, after=96)] == [97, 98, 99]
    spill = store._dir
    store.close()
    assert not spill.exists() and len(store) == 0


def test_float16_state_measures_what_it_loses(tmp_path):
    size = 20 * SIZE  # blobs of many pages: the file's size is the data's
    rng = np.random.default_rng(0)
    values = {c: rng.normal(size=size).astype(np.float32) for c in range(5)}
    half, full = (ClientStateStore(size, 0, dtype=d, spill_dir=tmp_path)
                  for d in ("float16", "float32"))
    for c, v in values.items():
        half.put(c, v, 1)
        full.put(c, v, 1)
    err = [np.linalg.norm(half.get(c) - v) / np.linalg.norm(v) for c, v in values.items()]
    loss = half.stats()["precision_loss"]
    assert 1e-5 < loss < 1e-3  # float16 keeps ~11 bits
    assert loss == pytest.approx(np.sqrt(np.mean(np.square(err))), rel=0.05)
    assert full.stats()["precision_loss"] == 0.0
    assert half.stats()["disk_bytes"] < 0.6 * full.stats()["disk_bytes"]
    half.close()
    full.close()


def test_spill_dirs_of_dead_processes_are_swept(tmp_path):
    proc = subprocess.Popen(["true"])  # a pid that is gone
    proc.wait()
    left = tmp_path / f"ssdiff-client-state-{proc.pid}-abc"
    left.mkdir()
    (left / "spill.sqlite").write_bytes(b"x" * 100)
    store = ClientStateStore(SIZE, 0, spill_dir=tmp_path)
    store.put(0, np.ones(SIZE, np.float32), 1)  # first spill opens the file, sweeping
    assert not left.exists() and store._dir.exists()
    store.close()


def test_a_full_disk_stops_with_one_line_naming_it(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    store = ClientStateStore(SIZE * 10, 0, spill_dir=mnt)
    try:
        with pytest.raises(ClientStateError) as e:
            for c in range(100):  # 40 KB each: the 256 KB disk fills up
                store.put(c, np.full(SIZE * 10, c, np.float32), 1)
        msg = str(e.value)
        assert str(mnt) in msg and "full" in msg and "\n" not in msg
        # nothing already kept is lost: what was spilled, and the one that did not fit
        assert len(store) == c + 1
        for k in range(c + 1):
            assert np.array_equal(store.get(k), np.full(SIZE * 10, k, np.float32)), k
    finally:
        store.close()
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: detached even if still busy


def _file(tmp_path, create=True, run_id="run-a", size=SIZE, dtype="float32"):
    return ClientStateFile(tmp_path, run_id, size, dtype, create=create)


def test_run_file_is_incremental_and_reads_the_committed_checkpoint(tmp_path):
    values = _values(6)
    f = _file(tmp_path)
    f.write(((c, 1, v) for c, v in values.items()), committed=0)  # checkpoint of round 1
    f.write([(0, 3, -values[0]), (1, 3, -values[1])], committed=1)  # round 3: what changed
    # round 5's checkpoint, whose checkpoint.json never committed: client 0's array goes in
    # place into the slot round 1 held (no committed checkpoint reads it any more)
    f.write([(0, 5, 2 * values[0])], committed=3)
    f.close()
    f = _file(tmp_path, create=False)
    got = {c: (r, v) for c, r, v in f.read(through=3)}
    assert sorted(got) == list(range(6))
    assert got[0][0] == 3 and np.array_equal(got[0][1], -values[0])  # not round 5's
    assert got[2][0] == 1 and np.array_equal(got[2][1], values[2])
    # the resumed run checkpoints round 5 again (committed = 3): it overwrites the leftover
    f.write([(0, 5, 3 * values[0]), (2, 5, -values[2])], committed=3)
    got = {c: (r, v) for c, r, v in f.read(through=5)}
    assert got[0][0] == 5 and np.array_equal(got[0][1], 3 * values[0])
    assert np.array_equal(got[2][1], -values[2]) and np.array_equal(got[1][1], -values[1])
    f.close()
    rows = sqlite3.connect(tmp_path / FILE).execute("SELECT COUNT(*) FROM state").fetchone()[0]
    assert rows == 6 + 3  # at most two slots a client: the file does not grow per checkpoint


def test_run_file_of_another_run_or_shape_is_refused(tmp_path):
    f = _file(tmp_path)
    f.write([(0, 1, np.ones(SIZE, np.float32))], committed=0)
    f.close()
    for kw, what in [({"run_id": "run-b"}, "another run"), ({"size": 2 * SIZE}, "state length"),
                     ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(ClientStateError, match=what) as e:
            _file(tmp_path, create=False, **kw)
        assert str(tmp_path / FILE) in str(e.value)
    (tmp_path / "other").mkdir()
    with pytest.raises(ClientStateError, match="missing"):
        _file(tmp_path / "other", create=False)


def test_run_file_with_an_edited_or_truncated_row_is_refused(tmp_path):
    f = _file(tmp_path)
    f.write([(0, 1, np.ones(SIZE, np.float32)), (1, 1, np.ones(SIZE, np.float32))], committed=0)
    f.close()
    db = sqlite3.connect(tmp_path / FILE)
    with db:
        db.execute("UPDATE state SET data = ? WHERE client_id = 1",
                   (np.full(SIZE, 2, np.float32).tobytes(),))
    db.close()
    with pytest.raises(ClientStateError, match="client 1's state .* corrupt"):
        list(_file(tmp_path, create=False).read(1))
    (tmp_path / FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ClientStateError, match="not a readable client-state file"):
        _file(tmp_path, create=False)


def test_pool_with_a_tiny_cache_trains_exactly_as_one_that_keeps_all_in_ram(tmp_path):
    """Error feedback over three rounds through the spill file gives the same payloads."""
    x = np.random.default_rng(0).random((60, 1, 8, 8), dtype=np.float32)
    y = np.arange(60) % 10
    write_shards(x, y, dirichlet_split(y, 6, 0.5, 0), tmp_path / "shards")
    base = [*TINY, "data.image_size=8", "quant.error_feedback=true"]
    small = ClientPool(config.load(None, [*base, "clients.state_cache_mib=0.0001"]),
                       tmp_path / "shards")
    big = ClientPool(config.load(None, base), tmp_path / "shards")
    flat = ParameterServer(small.cfg, 1).weights
    ids, bits, steps = np.arange(6), np.full(6, 4), np.full(6, 2)
    for r in (1, 2, 3):
        a = small.train_round(flat, r, ids, bits, steps)[1]
        b = big.train_round(flat, r, ids, bits, steps)[1]
        assert np.array_equal(a, b), r
    assert small.state_stats()["on_disk"] == 6 and big.state_stats()["on_disk"] == 0
    for c in ids:
        assert np.array_equal(small.residuals.get(c), big.residuals.get(c))
    # a checkpoint reads them in batches of at most max_bytes (at least one row each)
    assert [r[0] for r in small.state_since(2, max_bytes=1)] == [0]
    assert [r[0] for r in small.state_since(2, after=0, max_bytes=small.num_params * 8)] == [1, 2]
    assert small.state_since(3) == []
    small.clear_state()
