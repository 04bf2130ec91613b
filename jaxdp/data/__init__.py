"""Data: the embedded default dataset and loaders for users' local files (npz, CSV, MNIST IDX).

Every loader returns a :class:`Dataset` of numpy arrays: images as float32 ``[N, H, W, C]`` scaled to [0, 1],
labels as int32 ``[N]``. Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import os
from importlib import resources
from typing import NamedTuple

import numpy as np


class DataValidationError(ValueError):
    """The data cannot be trained on as given (non-finite features, labels that are not 0..K-1 integers, a
    single class, shapes that do not fit the model); the message names the file, the array or column, and the
    count of bad values, with what to do."""


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "dataset"

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _images(x: np.ndarray, scale: float) -> np.ndarray:
    x = np.asarray(x, np.float32) / scale
    if x.ndim == 3:
        x = x[..., None]
    return x


def load_digits() -> Dataset:
    """The embedded 8x8 digits (UCI, CC BY 4.0; see ``jaxdp/data/DIGITS.md``): 1,437 train / 360 test."""
    with resources.files("jaxdp.data").joinpath("digits.npz").open("rb") as f:
        d = np.load(f)
        return Dataset(_images(d["x_train"], 16.0), d["y_train"].astype(np.int32),
                       _images(d["x_test"], 16.0), d["y_test"].astype(np.int32), "digits")


def load_npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 images are scaled by 255)."""
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(d)
    if missing:
        raise KeyError(f"{path}: the npz file lacks arrays {sorted(missing)}; it needs x_train, y_train, "
                       "x_test, y_test")
    scale = 255.0 if d["x_train"].dtype == np.uint8 else 1.0
    return Dataset(_images(d["x_train"], scale), d["y_train"].astype(np.int32),
                   _images(d["x_test"], scale), d["y_test"].astype(np.int32), os.path.basename(str(path)))


def _split(x, y, test_fraction: float, seed: int, name: str) -> Dataset:
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], name)


def load_csv(path: str | os.PathLike, label_column: str | int = "label", *, test_fraction: float = 0.2,
             seed: int = 0, scale: float = 1.0) -> Dataset:
    """A CSV of numeric features with a header; ``label_column`` (name or index) holds integer labels.

    The rows are split into train and test by a seeded permutation (the split is public, not private).
    """
    with open(path) as f:
        header = f.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if isinstance(label_column, str):
        if label_column not in header:
            raise KeyError(f"{path}: no column named {label_column!r}; columns are {header}")
        label_column = header.index(label_column)
    y = data[:, label_column].astype(np.int32)
    x = (np.delete(data, label_column, axis=1) / scale).astype(np.float32)
    return _split(x, y, test_fraction, seed, os.path.basename(str(path)))


def _read_idx(path: str | os.PathLike) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but the file holds {data.size} values")
    return data.reshape(dims)


def load_idx(train_images, train_labels, test_images, test_labels, name: str = "mnist") -> Dataset:
    """MNIST-format IDX files (optionally gzipped), e.g. ``train-images-idx3-ubyte.gz``."""
    return Dataset(_images(_read_idx(train_images), 255.0), _read_idx(train_labels).astype(np.int32),
                   _images(_read_idx(test_images), 255.0), _read_idx(test_labels).astype(np.int32), name)


def load_dataset(name: str, **kwargs) -> Dataset:
    """``"digits"`` (embedded), or a path to a ``.npz`` / ``.csv`` file, or a directory of MNIST IDX files."""
    if name == "digits":
        return load_digits()
    if os.path.isdir(name):
        files = {"-".join(f.split("-")[:2]): os.path.join(name, f) for f in os.listdir(name)
                 if "idx" in f and f.count("-") >= 1}
        try:
            return load_idx(files["train-images"], files["train-labels"], files["t10k-images"],
                            files["t10k-labels"], os.path.basename(name))
        except KeyError:
            raise FileNotFoundError(f"{name}: expected MNIST IDX files train-images-*, train-labels-*, "
                                    "t10k-images-*, t10k-labels-*") from None
    if not os.path.exists(name):
        raise FileNotFoundError(f"dataset {name!r}: not 'digits' and no such file")
    if name.endswith(".npz"):
        return load_npz(name)
    if name.endswith(".csv"):
        return load_csv(name, **kwargs)
    raise ValueError(f"dataset {name!r}: unsupported format; use 'digits', .npz, .csv or an IDX directory")


__all__ = ["DataValidationError", "Dataset", "load_digits", "load_npz", "load_csv", "load_idx", "load_dataset"]
