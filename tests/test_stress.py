"""``ssdiff stress`` on the session's local Ray: rows per count, Parquet, PNG and the fit."""

import pandas as pd
import pytest

from ssdiff_ray import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def test_stress_two_counts(tmp_path, capsys):
    rc = cli.main(["stress", "--clients", "20,40", "--rounds", "2", "--out", str(tmp_path),
                   "--set", "clients.pools=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fit: round wall" in out and "fit: total RSS" in out
    per = pd.read_parquet(tmp_path / "stress.parquet")
    assert list(per["clients"]) == [20, 40] and list(per["selected"]) == [2, 4]
    for col in ("wall_s", "overhead_ms_per_client", "driver_rss_mib", "server_rss_mib",
                "pools_rss_mib", "object_store_mib"):
        assert (per[col] >= 0).all(), col
    assert (per["pools_rss_mib"] > 0).all() and (per["server_rss_mib"] > 0).all()
    rounds = pd.read_parquet(tmp_path / "stress_rounds.parquet")
    assert len(rounds) == 4
    assert (tmp_path / "stress.png").stat().st_size > 0


def test_stress_bad_counts_one_line(capsys):
    assert cli.main(["stress", "--clients", "10,abc"]) == 2
    assert cli.main(["stress", "--clients", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--clients" in err
