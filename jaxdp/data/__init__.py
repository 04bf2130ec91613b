"""Data: the embedded default dataset and loaders for users' local files (npz, CSV, MNIST IDX).

Every loader returns a :class:`Dataset` of numpy arrays: features as float32 (images ``[N, H, W, C]``; uint8
images are scaled to [0, 1]), labels as int32 ``[N]`` in ``0..K-1``. Nothing is ever downloaded.

Every loader checks what it returns (:func:`check_dataset`) and refuses, with the file, the array or column and
the count of bad values, data that would train silently wrong: NaN/inf features, labels that are negative,
fractional, 1-based or leave classes unused (``{0, 1000}`` would make a 1001-class model), a single class.
"""
from __future__ import annotations

import gzip
import inspect
import os
import pickle
import zipfile
from importlib import resources
from typing import NamedTuple
from collections.abc import Callable

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


def _count_bad(mask: np.ndarray, what: str, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(int(i)) for i in idx[:limit]) + (", ..." if idx.size > limit else "")
    return f"{idx.size} {what} (0-based rows {shown})"


def check_features(x: np.ndarray, source: str, name: str, columns: list[str] | None = None) -> None:
    """Refuse non-finite features, naming the array (and the CSV columns) and counting the bad values."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise DataValidationError(f"{source}: {name} has dtype {x.dtype}; features must be numbers")
    if np.issubdtype(x.dtype, np.integer):
        return
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    per_row = bad.reshape(len(x), -1).any(axis=1)
    where = ""
    if columns is not None and x.ndim == 2:
        cols = [f"{columns[j]!r}: {int(bad[:, j].sum())}" for j in np.flatnonzero(bad.any(axis=0))]
        where = f" in column(s) {', '.join(cols)}"
    raise DataValidationError(
        f"{source}: {name}: {int(bad.sum())} NaN/inf value(s){where}, in {_count_bad(per_row, 'examples')}. "
        "DP-SGD would drop those examples from every gradient (the loss becomes nan): impute or remove them "
        "before training (imputation statistics computed on the private data are themselves a release).")


def check_labels(y: np.ndarray, source: str, name: str = "labels") -> np.ndarray:
    """Return ``y`` as int32 after refusing labels that are not integers >= 0 (named, with counts)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataValidationError(f"{source}: {name} must be a 1-D array of class indices, got shape {y.shape} "
                                  "(one-hot labels: use y.argmax(axis=1))")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
            or np.issubdtype(y.dtype, np.bool_)):
        raise DataValidationError(f"{source}: {name} has dtype {y.dtype}; labels must be integer class indices")
    if np.issubdtype(y.dtype, np.floating):
        nonfinite = ~np.isfinite(y)
        if nonfinite.any():
            raise DataValidationError(f"{source}: {name}: {_count_bad(nonfinite, 'NaN/inf labels')}")
        frac = y != np.round(y)
        if frac.any():
            raise DataValidationError(
                f"{source}: {name}: {_count_bad(frac, 'fractional labels')}, e.g. {float(y[frac][0]):g}; "
                f"labels must be "
                "integer class indices 0..K-1 (they would be truncated). For regression targets use your own "
                "loss through jaxdp.PrivacyEngine.")
    neg = y < 0
    if neg.any():
        raise DataValidationError(f"{source}: {name}: {_count_bad(neg, 'negative labels')}, e.g. {int(y[neg][0])}; "
                                  "labels must be class indices 0..K-1")
    return y.astype(np.int32)


def check_classes(y_train: np.ndarray, y_test: np.ndarray, source: str, num_classes: int | None = None) -> None:
    """Refuse label sets that are not ``0..K-1`` (1-based labels, unused classes), a single training class, or
    labels outside a model's ``num_classes`` outputs."""
    present = np.unique(np.concatenate([np.asarray(y_train).ravel(), np.asarray(y_test).ravel()]))
    if present.size == 0:
        raise DataValidationError(f"{source}: no labels")
    k = int(present.max()) + 1
    if num_classes is not None and k > num_classes:
        out = np.asarray(y_train) >= num_classes
        raise DataValidationError(
            f"{source}: {_count_bad(out, f'training labels >= {num_classes}')} but the model has {num_classes} "
            f"outputs (classes 0..{num_classes - 1}): build the model with num_classes={k} or remap the labels")
    if int(present.min()) >= 1 and present.size == k - 1:
        raise DataValidationError(
            f"{source}: the labels are 1..{k - 1} (1-based): jaxdp expects class indices 0..K-1, and class 0 "
            f"would be an output that never occurs. Subtract 1 from the labels.")
    missing = np.setdiff1d(np.arange(k), present)
    if missing.size:
        shown = ", ".join(str(int(c)) for c in missing[:5]) + (", ..." if missing.size > 5 else "")
        msg = (f"{source}: the labels take {present.size} distinct values but the largest is {k - 1}, so the "
               f"model gets {k} classes of which {missing.size} never occur ({shown}). Remap the labels to "
               f"0..{present.size - 1}, e.g. np.unique(y, return_inverse=True)[1]")
        if missing.size > present.size:   # mostly-empty label space: a coding error (e.g. labels {0, 1000})
            raise DataValidationError(msg + ".")
        import warnings                   # a few classes absent from a small sample can be genuine
        warnings.warn(msg + ", unless those classes are only absent from this sample.", stacklevel=3)
    if np.unique(np.asarray(y_train)).size < 2:
        raise DataValidationError(
            f"{source}: the training labels hold a single class ({int(np.asarray(y_train).ravel()[0])}): there is "
            "nothing to learn (accuracy would be 1.0 by construction). Check the label column.")


def check_dataset(ds: Dataset, source: str, columns: list[str] | None = None) -> Dataset:
    """Check a :class:`Dataset` (features finite, labels 0..K-1 with >= 2 classes, lengths match); return it
    with int32 labels. Raises :class:`DataValidationError` naming ``source``, the array/column and the count."""
    for xs, ys, split in ((ds.x_train, ds.y_train, "train"), (ds.x_test, ds.y_test, "test")):
        if len(xs) != len(ys):
            raise DataValidationError(f"{source}: x_{split} has {len(xs)} examples but y_{split} has {len(ys)}")
        check_features(xs, source, f"x_{split}", columns)
    y_train = check_labels(ds.y_train, source, "y_train" if columns is None else "label column (train)")
    y_test = check_labels(ds.y_test, source, "y_test" if columns is None else "label column (test)")
    if len(y_train) == 0:
        raise DataValidationError(f"{source}: the training set is empty")
    check_classes(y_train, y_test, source)
    return ds._replace(y_train=y_train, y_test=y_test)


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


def load_npz(path: str | os.PathLike, scale: float | None = None) -> Dataset:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test``; labels integer class indices ``0..K-1``.

    Features: ``scale=None`` (default) divides uint8 arrays by 255 (images to [0, 1]) and keeps float arrays as
    they are -- except float arrays that look like unscaled 0-255 pixels (integer values, maximum above 1),
    which are refused: pass ``scale=255`` to rescale them or ``scale=1`` to keep them. An explicit ``scale``
    divides every feature by it. ``[N, H, W]`` images get a channel axis (``[N, H, W, 1]``).
    """
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
    if scale is None:
        scale = 255.0 if d["x_train"].dtype == np.uint8 else 1.0
        x = d["x_train"]
        if np.issubdtype(x.dtype, np.floating) and x.size and np.isfinite(x).all():
            hi = float(x.max())
            if 1.0 < hi <= 255.0 and float(x.min()) >= 0.0 and bool(np.all(x == np.round(x))):
                raise DataValidationError(
                    f"{path}: x_train is {x.dtype} with integer values 0..{hi:g}, which looks like unscaled 0-255 "
                    "pixels; load_npz keeps float arrays as they are. Pass scale=255 (YAML: data: {options: "
                    "{scale: 255}}) to rescale to [0, 1], or scale=1 to keep the values, or store uint8.")
    else:
        scale = _checks_positive_scale(scale)
    ds = Dataset(_images(d["x_train"], scale), d["y_train"], _images(d["x_test"], scale), d["y_test"],
                 os.path.basename(str(path)))
    return check_dataset(ds, str(path))


def _checks_positive_scale(scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number > 0, got {scale!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return s


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
    columns = [c for j, c in enumerate(header) if j != label_column]
    y = check_labels(data[:, label_column], str(path), f"label column {header[label_column]!r}")
    x = (np.delete(data, label_column, axis=1) / scale).astype(np.float32)
    check_features(x, str(path), "features", columns)
    if standardize not in (None, False):
        x = standardize_features(x, standardize, [h for i, h in enumerate(header) if i != label_column],
                                 label_column=header[label_column], scale=scale, source=str(path))
    return check_dataset(_split(x, y, test_fraction, seed, os.path.basename(str(path))), str(path), columns)


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
    return check_dataset(Dataset(_images(_read_idx(train_images), 255.0), _read_idx(train_labels),
                                 _images(_read_idx(test_images), 255.0), _read_idx(test_labels), name),
                         f"{name} (IDX files)")


def load_dataset(name: str, **kwargs) -> Dataset:
    """``"digits"`` (embedded), or a path to a ``.npz`` / ``.csv`` file, or a directory of MNIST IDX files.

    ``kwargs`` are the loader's options (``data.options`` of a trainer config): a CSV's (:func:`load_csv`) or an
    npz's (:func:`load_npz`: ``scale``); an unknown option is an error naming it, never silently ignored."""
    kind = "csv" if str(name).endswith(".csv") else "digits" if name == "digits" else \
        "npz" if str(name).endswith(".npz") else "IDX directory"
    loaders: dict[str, Callable[..., Dataset]] = {"csv": load_csv, "npz": load_npz}
    loader = loaders.get(kind)
    allowed = [p for p in inspect.signature(loader).parameters if p != "path"] if loader else []
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown} for the {kind} dataset {name!r}; "
                         + (f"a {kind} dataset takes {allowed}" if allowed else f"a {kind} dataset takes no options"))
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
        unknown = sorted(set(kwargs) - {"scale"})
        if unknown:
            raise ValueError(f"data options {unknown} do not apply to an .npz file (allowed: scale)")
        return load_npz(name, **kwargs)
    if name.endswith(".csv"):
        return load_csv(name, **kwargs)
    raise ValueError(f"dataset {name!r}: unsupported format; use 'digits', .npz, .csv or an IDX directory")


__all__ = ["DataValidationError", "Dataset", "check_dataset", "check_features", "check_labels", "check_classes",
           "load_digits", "load_npz", "load_csv", "load_idx", "load_dataset", "standardize_features"]
