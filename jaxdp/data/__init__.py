"""Data: the embedded default dataset and loaders for users' local files (npz, CSV, MNIST IDX).

Every loader returns a :class:`Dataset` of numpy arrays: images as float32 ``[N, H, W, C]`` scaled to [0, 1],
labels as int32 ``[N]``. Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import inspect
import os
import pickle
import zipfile
from importlib import resources
from typing import NamedTuple

import numpy as np


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
    try:
        loaded = np.load(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); write it with "
                         "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive of x_train, y_train, x_test, y_test")
    try:
        with loaded as f:
            d = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path}: a damaged .npz file ({type(e).__name__}: {e})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(d)
    if missing:
        raise KeyError(f"{path}: the npz file lacks arrays {sorted(missing)}; it needs x_train, y_train, "
                       "x_test, y_test")
    scale = 255.0 if d["x_train"].dtype == np.uint8 else 1.0
    return Dataset(_images(d["x_train"], scale), d["y_train"].astype(np.int32),
                   _images(d["x_test"], scale), d["y_test"].astype(np.int32), os.path.basename(str(path)))


def _split(x, y, test_fraction: float, seed: int, name: str) -> Dataset:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"{name}: data option 'test_fraction' must be a number in (0, 1) (the share of rows held "
                         f"out to measure test accuracy), got {test_fraction!r}")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    if n_test < 1 or n_test >= len(y):
        raise ValueError(f"{name}: test_fraction {test_fraction} of {len(y)} rows leaves {n_test} test and "
                         f"{len(y) - n_test} training rows; both need at least one")
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], name)


def load_csv(path: str | os.PathLike, label_column: str | int = "label", *, test_fraction: float = 0.2,
             seed: int = 0, scale: float = 1.0, standardize: dict | bool | None = None) -> Dataset:
    """A CSV of numeric features with a header; ``label_column`` (name or index) holds integer labels.

    The rows are split into train and test by a seeded permutation (the split is public, not private).
    ``standardize``: ``{"mean": m, "std": s}`` (numbers or one per feature) or ``{"public_csv": FILE}`` (a CSV
    of PUBLIC data with the same columns, whose mean/std are used) maps each feature to ``(x - m) / s``.
    Statistics computed on the private training data are refused: they are a function of every example and
    would leak it outside the DP guarantee (see :func:`standardize_features`).
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
    if standardize not in (None, False):
        x = standardize_features(x, standardize, [h for i, h in enumerate(header) if i != label_column],
                                 label_column=header[label_column], scale=scale, source=str(path))
    return _split(x, y, test_fraction, seed, os.path.basename(str(path)))


def standardize_features(x: np.ndarray, spec: dict | bool, columns: list[str], *, label_column: str | int = "label",
                         scale: float = 1.0, source: str = "data") -> np.ndarray:
    """``(x - mean) / std`` per feature with PUBLIC statistics: ``spec = {"mean": ..., "std": ...}`` (a number or
    one value per feature) or ``{"public_csv": FILE}`` (a public CSV with the same feature columns).

    Privacy: the mean and standard deviation of the private training data depend on every example; using them
    (in the model, or published with it) is outside the DP-SGD guarantee. They are therefore never computed
    here from the data being trained on: ``standardize: true`` is refused with this reason.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: data option 'standardize' needs PUBLIC statistics: standardize: {{mean: [...], "
                         "std: [...]}} (one value per feature, or one number) or standardize: {public_csv: FILE}. "
                         "jaxdp does not compute them from the private training data: such statistics depend on "
                         "every example and would leak it outside the DP guarantee")
    unknown = set(spec) - {"mean", "std", "public_csv"}
    if unknown or not (("mean" in spec and "std" in spec) ^ ("public_csv" in spec)):
        raise ValueError(f"{source}: data option 'standardize' takes either mean and std, or public_csv; "
                         f"got {sorted(spec)}")
    if "public_csv" in spec:
        pub = load_csv(spec["public_csv"], label_column, test_fraction=0.5, scale=scale)
        ref = np.concatenate([pub.x_train, pub.x_test])
        mean, std = ref.mean(0), ref.std(0)
    else:
        mean = np.broadcast_to(np.asarray(spec["mean"], np.float64), (x.shape[1],)) \
            if np.ndim(spec["mean"]) == 0 else np.asarray(spec["mean"], np.float64)
        std = np.broadcast_to(np.asarray(spec["std"], np.float64), (x.shape[1],)) \
            if np.ndim(spec["std"]) == 0 else np.asarray(spec["std"], np.float64)
    for what, v in (("mean", mean), ("std", std)):
        if v.shape != (x.shape[1],):
            raise ValueError(f"{source}: standardize {what} has {v.shape[0] if v.ndim else 1} values but there are "
                             f"{x.shape[1]} feature columns {columns}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{source}: standardize {what} holds non-finite values")
    if np.any(std <= 0):
        bad = [columns[i] for i in np.flatnonzero(std <= 0)]
        raise ValueError(f"{source}: standardize std must be > 0 for every feature; columns {bad} have std <= 0")
    return ((x - mean) / std).astype(np.float32)


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
    """``"digits"`` (embedded), or a path to a ``.npz`` / ``.csv`` file, or a directory of MNIST IDX files.

    ``kwargs`` are the loader's options (``data.options`` of a trainer config): only a CSV takes any
    (:func:`load_csv`); an unknown option is an error naming it, never silently ignored."""
    kind = "csv" if str(name).endswith(".csv") else "digits" if name == "digits" else \
        "npz" if str(name).endswith(".npz") else "IDX directory"
    allowed = [p for p in inspect.signature(load_csv).parameters if p != "path"] if kind == "csv" else []
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown} for the {kind} dataset {name!r}; "
                         + (f"a CSV takes {allowed}" if allowed else f"a {kind} dataset takes no options"))
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


__all__ = ["Dataset", "load_digits", "load_npz", "load_csv", "load_idx", "load_dataset", "standardize_features"]
