"""Data: built-in digits, user Parquet tables, the Dirichlet split, shards."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssdiff_ray.data import DataError
from ssdiff_ray.data.digits import load_digits
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


def _load(tmp_path, name, path, **kw):
    from ssdiff_ray import config
    from ssdiff_ray.data import load_dataset

    sets = [f"data.name={name}", f"data.path={path}", *(f"data.{k}={v}" for k, v in kw.items())]
    return load_dataset(config.load(None, sets).data)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_user_parquet_png_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    imgs = (rng.random((6, 12, 12)) * 255).astype(np.uint8)
    p1 = tmp_path / "png.parquet"
    pq.write_table(pa.table({"image": [_png(im) for im in imgs], "label": list(range(6))}), p1)
    d = _load(tmp_path, "parquet", p1, image_size=12)
    assert d.images.shape == (6, 1, 12, 12) and list(d.labels) == list(range(6))
    np.testing.assert_allclose((d.images[:, 0] + 1) / 2 * 255, imgs, atol=1e-3)
    p2 = tmp_path / "arr.parquet"
    pq.write_table(pa.table({"pixels": [im.ravel().tolist() for im in imgs]}), p2)
    d2 = _load(tmp_path, "parquet", p2, image_column="pixels", image_size=16)
    assert d2.images.shape == (6, 1, 16, 16) and (d2.labels == -1).all()


def test_hugging_face_image_struct_rgb_and_class_names(tmp_path):
    """What `datasets` writes for an Image column: a struct of PNG bytes and a path; string
    labels become class names, sorted."""
    rng = np.random.default_rng(1)
    imgs = (rng.random((4, 10, 10, 3)) * 255).astype(np.uint8)
    structs = [{"bytes": _png(im), "path": f"img{i}.png"} for i, im in enumerate(imgs)]
    p = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": structs, "label": ["dog", "cat", "dog", "ant"]}), p)
    d = _load(tmp_path, "parquet", p, image_size=10)
    assert d.images.shape == (4, 3, 10, 10) and d.class_names == ["ant", "cat", "dog"]
    assert list(d.labels) == [2, 1, 2, 0]
    np.testing.assert_allclose((d.images[1].transpose(1, 2, 0) + 1) / 2 * 255, imgs[1], atol=1e-3)
    arr = tmp_path / "hwc.parquet"  # H x W x C arrays in [0, 1]
    pq.write_table(pa.table({"image": [(im / 255.0).tolist() for im in imgs]}), arr)
    assert _load(tmp_path, "parquet", arr, image_size=10).images.shape == (4, 3, 10, 10)


def test_image_folder_class_names_become_labels(tmp_path):
    rng = np.random.default_rng(2)
    for k, name in enumerate(["zebra", "apple"]):
        (tmp_path / "root" / name).mkdir(parents=True)
        for i in range(3):
            im = (rng.random((12 + k, 12, 3)) * 255).astype(np.uint8)  # sizes may differ
            (tmp_path / "root" / name / f"{i}.{'png' if i else 'jpg'}").write_bytes(
                _png(im, "PNG" if i else "JPEG"))
    d = _load(tmp_path, "image_folder", tmp_path / "root", image_size=8)
    assert d.images.shape == (6, 3, 8, 8) and d.class_names == ["apple", "zebra"]
    assert sorted(d.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_image_folder_converts_every_mode_and_counts_what_it_did(tmp_path):
    """As torchvision's ImageFolder: grey, palette, CMYK and RGBA files in one folder load
    as RGB (grey with data.channels = 1); non-images are skipped; a warning counts both."""
    from PIL import Image

    rng = np.random.default_rng(4)
    rgb = Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8))
    files = {"grey.png": rgb.convert("L"), "pal.png": rgb.convert("P"),
             "cmyk.jpg": rgb.convert("CMYK"), "rgba.png": rgb.convert("RGBA"), "rgb.png": rgb}
    for cls in ("a", "b"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for name, im in files.items():
            im.save(tmp_path / "root" / cls / name)
    (tmp_path / "root" / "a" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as w:
        d = _load(tmp_path, "image_folder", tmp_path / "root", image_size=12)
    msg = str(w[0].message)
    assert d.images.shape == (10, 3, 12, 12)
    assert "8 images converted to RGB (2 CMYK, 2 L, 2 P, 2 RGBA)" in msg
    assert "1 files that are not images skipped (a/notes.txt)" in msg
    grey = _load(tmp_path, "image_folder", tmp_path / "root", image_size=12, channels=1)
    assert grey.images.shape == (10, 1, 12, 12)
    (tmp_path / "root" / "b" / "broken.jpg").write_bytes(_png(np.zeros((12, 12), np.uint8),
                                                              "JPEG")[:40])
    with pytest.raises(DataError) as e:
        _load(tmp_path, "image_folder", tmp_path / "root", image_size=12)
    assert "broken.jpg: not a readable image" in str(e.value) and "BytesIO" not in str(e.value)


def test_conditional_run_on_one_class_and_pretrain_onto_a_file_are_one_line(tmp_path, capsys):
    from ssdiff_ray import cli

    (tmp_path / "root" / "only").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "root" / "only" / f"{i}.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    assert cli.main(["run", "--quiet", "--set", "data.name=image_folder", "--set",
                     f"data.path={tmp_path / 'root'}", "--set", "model.conditional=true",
                     "--set", f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "one class" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["pretrain", "--out", str(tmp_path / "file"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ssdiff: error: --out {tmp_path / 'file'}: exists and is not a directory"]


def test_colour_digits_are_seeded_rgb_with_ten_classes():
    from ssdiff_ray.data.colour_digits import make_colour_digits

    x, y = make_colour_digits(copies=1)
    assert x.shape == (1797, 3, 32, 32) and set(y.tolist()) == set(range(10))
    assert np.array_equal(x[:5], make_colour_digits(copies=1)[0][:5])
    def digit_colour(k):  # mean colour of the bright (digit) pixels of class k
        imgs = x[y == k].transpose(0, 2, 3, 1).reshape(-1, 3)
        return imgs[imgs.max(1) > 0.7].mean(0)

    assert np.abs(digit_colour(1) - digit_colour(6)).max() > 0.3  # colour tells the class


def _bad(tmp_path, kind):
    """(source, path, extra config) of one kind of bad data."""
    rng = np.random.default_rng(3)
    grey = (rng.random((12, 12)) * 255).astype(np.uint8)
    rgb = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    p = tmp_path / "bad.parquet"
    if kind == "mixed_channels":
        pq.write_table(pa.table({"image": [_png(grey), _png(rgb)]}), p)
    elif kind == "unreadable":
        pq.write_table(pa.table({"image": [_png(grey), b"not a png"]}), p)
    elif kind == "tiny":
        pq.write_table(pa.table({"image": [_png(grey), _png(grey[:5, :5])]}), p)
    elif kind == "strings_for_ints":
        pq.write_table(pa.table({"image": [_png(grey)] * 2, "label": ["a", "b"]}), p)
        return "parquet", p, {"label_type": "int"}
    elif kind == "ints_for_names":
        pq.write_table(pa.table({"image": [_png(grey)] * 2, "label": [1, 2]}), p)
        return "parquet", p, {"label_type": "name"}
    elif kind == "empty_class":
        for name in ("a", "b"):
            (tmp_path / "root" / name).mkdir(parents=True)
        (tmp_path / "root" / "a" / "x.png").write_bytes(_png(grey))
        return "image_folder", tmp_path / "root", {}
    elif kind == "flat":
        pq.write_table(pa.table({"image": [[1.0, 2.0, 3.0]]}), p)
    return "parquet", p, {}


@pytest.mark.parametrize("kind, needle", [
    ("mixed_channels", "row 1: 3 channels, but dataset"),
    ("unreadable", "row 1: not an image (no format PIL reads)"),
    ("tiny", "row 1: image is 5 x 5 px, at least 8 x 8"),
    ("strings_for_ints", "row 0: label 'a' is a string; the column holds integers"),
    ("ints_for_names", "row 0: label 1 is a number; the column holds class names"),
    ("empty_class", "class folder 'b' has no images"),
    ("flat", "row 0: flat image of 3 values is not square"),
])
def test_bad_user_data_one_clear_line(tmp_path, kind, needle):
    name, path, extra = _bad(tmp_path, kind)
    with pytest.raises(DataError) as e:
        _load(tmp_path, name, path, **extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_data_starts_nothing(tmp_path, capsys):
    from ssdiff_ray import cli

    name, path, extra = _bad(tmp_path, "mixed_channels")
    out = tmp_path / "runs"
    args = ["run", "--quiet", "--set", f"out_dir={out}", "--set", f"data.name={name}",
            "--set", f"data.path={path}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 channels" in err[0] and not out.exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        _load(tmp_path, "parquet", tmp_path / "nope.parquet")
