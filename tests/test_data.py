"""Data: built-in digits, user Parquet tables, the Dirichlet split, shards."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssdiff_ray.data import DataError
from ssdiff_ray.data.digits import load_digits
from ssdiff_ray.data.parquet import load_parquet_dataset
from ssdiff_ray.data.resize import resize
from ssdiff_ray.data.shards import read_shard, write_shards
from ssdiff_ray.data.split import dirichlet_split


def test_digits_scaled_and_resized():
    x, y = load_digits(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("shape,size", [((8, 8), 16), ((8, 8), 12), ((28, 28), 16),
                                        ((13, 17), 32), ((64, 64), 8)])
def test_numpy_resize_matches_torch_bilinear(shape, size):
    # the driver resizes without torch; the result must be torch's bilinear resize
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(size).random((3, *shape)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    got = resize(x, size)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_split_is_seeded_complete_and_non_iid():
    _, y = load_digits(8)
    a = dirichlet_split(y, 20, alpha=0.1, seed=3)
    b = dirichlet_split(y, 20, alpha=0.1, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    allidx = np.concatenate(a)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)  # a partition
    assert min(len(s) for s in a) >= 2
    # label skew: with small alpha most clients are dominated by one class
    top = [np.bincount(y[s], minlength=10).max() / len(s) for s in a]
    assert np.median(top) > 0.5
    # quantity skew
    sizes = np.array([len(s) for s in a])
    assert sizes.max() > 2 * sizes.min()
    # large alpha is close to IID
    iid = dirichlet_split(y, 5, alpha=1000.0, seed=3)
    top_iid = [np.bincount(y[s], minlength=10).max() / len(s) for s in iid]
    assert max(top_iid) < 0.2


def test_more_clients_than_samples_still_gives_everyone_data():
    y = np.arange(30) % 3
    split = dirichlet_split(y, 100, alpha=0.5, seed=0, min_samples=2)
    assert len(split) == 100 and min(len(s) for s in split) >= 2


def test_shards_round_trip(tmp_path):
    x, y = load_digits(16)
    split = dirichlet_split(y, 4, 0.5, 0)
    paths = write_shards(x, y, split, tmp_path)
    assert len(paths) == 4
    xi, yi = read_shard(paths[2])
    np.testing.assert_array_equal(xi, x[split[2]])
    np.testing.assert_array_equal(yi, y[split[2]])


def test_user_parquet_png_and_arrays(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = (rng.random((6, 12, 12)) * 255).astype(np.uint8)
    pngs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    p1 = tmp_path / "png.parquet"
    pq.write_table(pa.table({"image": pngs, "label": list(range(6))}), p1)
    x, y = load_parquet_dataset(p1, image_size=12)
    assert x.shape == (6, 1, 12, 12) and list(y) == list(range(6))
    np.testing.assert_allclose((x[:, 0] + 1) / 2 * 255, imgs, atol=1e-3)
    p2 = tmp_path / "arr.parquet"
    pq.write_table(pa.table({"pixels": [im.ravel().tolist() for im in imgs]}), p2)
    x2, y2 = load_parquet_dataset(p2, image_column="pixels", image_size=16)
    assert x2.shape == (6, 1, 16, 16) and (y2 == -1).all()


@pytest.mark.parametrize("table, needle", [
    (pa.table({"img": [b"x"]}), "no column 'image'"),
    (pa.table({"image": [b"not a png"]}), "row 0: image bytes are not a readable image"),
    (pa.table({"image": [[1.0, 2.0, 3.0]]}), "row 0: flat image of 3 values is not square"),
])
def test_bad_user_data_one_clear_line(tmp_path, table, needle):
    p = tmp_path / "bad.parquet"
    pq.write_table(table, p)
    with pytest.raises(DataError) as e:
        load_parquet_dataset(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_parquet_dataset(tmp_path / "nope.parquet")
