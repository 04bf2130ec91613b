"""Data loaders: the embedded digits and round trips through npz, CSV and hand-written IDX files."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from jaxdp import data


def test_load_digits():
    d = data.load_digits()
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.x_train.max() == 1.0
    assert set(np.unique(d.y_train)) == set(range(10)) and set(np.unique(d.y_test)) <= set(range(10))
    assert d.num_classes == 10 and d.input_shape == (8, 8, 1) and d.name == "digits"
    assert data.load_dataset("digits").x_train.shape == d.x_train.shape


def test_load_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    x_te = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    y_tr, y_te = np.array([0, 1, 2, 1, 0]), np.array([2, 2, 0])
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    d = data.load_npz(path)
    np.testing.assert_allclose(d.x_train[..., 0], x_tr / 255.0, rtol=1e-6)   # uint8 scaled to [0, 1]
    np.testing.assert_allclose(d.x_test[..., 0], x_te / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, y_tr)
    np.testing.assert_array_equal(d.y_test, y_te)
    assert d.num_classes == 3 and d.x_train.shape == (5, 4, 4, 1)
    # Float images are taken as they are; load_dataset dispatches on the extension.
    fpath = tmp_path / "f.npz"
    xf = rng.random((5, 3, 3, 2)).astype(np.float32)
    np.savez(fpath, x_train=xf, y_train=y_tr, x_test=xf[:3], y_test=y_te)
    np.testing.assert_array_equal(data.load_dataset(str(fpath)).x_train, xf)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=x_tr, y_train=y_tr)
    with pytest.raises(KeyError, match="x_test"):
        data.load_npz(bad)


def test_load_csv_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.integers(0, 10, (20, 3)).astype(float)
    labels = np.arange(20) % 4
    path = tmp_path / "t.csv"
    with open(path, "w") as f:
        f.write("f0,label,f1,f2\n")
        for x, y in zip(feats, labels):
            f.write(f"{x[0]},{y},{x[1]},{x[2]}\n")
    d = data.load_csv(path, test_fraction=0.25, seed=3, scale=10.0)
    assert d.x_train.shape == (15, 3) and d.x_test.shape == (5, 3)
    x_all = np.concatenate([d.x_train, d.x_test]) * 10.0
    y_all = np.concatenate([d.y_train, d.y_test])
    # Every row comes back once, with its own label.
    rows = {tuple(r): y for r, y in zip(feats, labels)}
    for r, y in zip(x_all, y_all):
        assert rows[tuple(np.round(r, 4))] == y
    assert sorted(y_all.tolist()) == sorted(labels.tolist())
    # The same split for the same seed; by column index too.
    d2 = data.load_csv(path, label_column=1, test_fraction=0.25, seed=3, scale=10.0)
    np.testing.assert_array_equal(d2.x_test, d.x_test)
    np.testing.assert_array_equal(data.load_dataset(str(path), test_fraction=0.25, seed=3, scale=10.0).y_test,
                                  d.y_test)
    with pytest.raises(KeyError, match="no column named"):
        data.load_csv(path, label_column="target")


def _write_idx(path, array, compress):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(2)
    tr_x = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    tr_y = rng.integers(0, 10, 6, dtype=np.uint8)
    te_x = rng.integers(0, 256, (2, 5, 4), dtype=np.uint8)
    te_y = np.array([3, 9], np.uint8)
    ext = ".gz" if compress else ""
    names = {"train-images-idx3-ubyte": tr_x, "train-labels-idx1-ubyte": tr_y,
             "t10k-images-idx3-ubyte": te_x, "t10k-labels-idx1-ubyte": te_y}
    paths = []
    for name, arr in names.items():
        p = tmp_path / (name + ext)
        _write_idx(p, arr, compress)
        paths.append(p)
    d = data.load_idx(*paths, name="tiny")
    assert d.x_train.shape == (6, 5, 4, 1) and d.x_train.dtype == np.float32
    np.testing.assert_allclose(d.x_train[..., 0], tr_x / 255.0, rtol=1e-6)
    np.testing.assert_allclose(d.x_test[..., 0], te_x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, tr_y)
    np.testing.assert_array_equal(d.y_test, te_y)
    assert d.y_train.dtype == np.int32
    # A directory of IDX files is found by name.
    d2 = data.load_dataset(str(tmp_path))
    np.testing.assert_array_equal(d2.x_test, d.x_test)


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 2]) + b"\0" * 8)   # float32 type code: unsupported
    with pytest.raises(ValueError, match="magic"):
        data._read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5]) + b"\1\2")    # header says 5 values, holds 2
    with pytest.raises(ValueError, match="header says"):
        data._read_idx(short)
    with pytest.raises(FileNotFoundError):
        data.load_dataset(str(tmp_path / "nothing.npz"))
    with pytest.raises(FileNotFoundError, match="IDX"):
        data.load_dataset(str(tmp_path))
