"""Atomic checkpoints of (params, optimiser state incl. noise RNG state) plus JSON metadata (accountant
history, sampler state, metrics so far). A resumed run continues bit-identically: the noise key of step t is
``fold_in(key, t)`` and the batch of step t is a function of ``(seed, t)``, both restored here.

One checkpoint is **one file**, ``ckpt-<step>.npz`` in the checkpoint directory: the array leaves (PRNG keys as
their key data), the metadata as a JSON entry, and a SHA-256 digest over both (every array's name, dtype, shape
and bytes, then the metadata). It is written to a temporary file, flushed to disk and renamed into place, so a
crash (even ``kill -9``) leaves either the previous checkpoint or the new one, never half of one. The previous
good checkpoint is kept next to the newest; older ones and stale temporaries are removed after each save.

:func:`load` refuses (:class:`CheckpointError`, naming the file) a checkpoint whose digest does not match --
an edited step count, status or array -- instead of resuming from it. Checkpoints written by earlier versions
(``checkpoint.npz`` + ``checkpoint.json``) are still read.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from typing import Any

import jax
import numpy as np

from jaxdp._io import TEMP_PREFIX, atomic_write

NPZ, META = "checkpoint.npz", "checkpoint.json"  # the format of earlier versions (read only)
_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
_META_KEY, _DIGEST_KEY = "__meta__", "__sha256__"
KEEP = 2  # the newest checkpoint and the previous good one


class CheckpointError(ValueError):
    """A checkpoint cannot be used (unreadable, fails its integrity check, or does not fit the run)."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(json.dumps([k, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    h.update(meta_bytes)
    return h.hexdigest()


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{int(step):09d}.npz")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoint files in ``directory``, newest first."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(out, reverse=True)


def save(directory: str, tree: Any, meta: dict, step: int | None = None) -> str:
    """Save the array pytree ``tree`` and JSON-able ``meta`` as one atomic file in ``directory``; returns its
    path. ``step`` names the file (default: ``meta["step"]``)."""
    os.makedirs(directory, exist_ok=True)
    step = int(meta["step"] if step is None else step)
    arrays, kinds = {}, []
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        if _is_key(leaf):
            arrays[f"a{i}"] = np.asarray(jax.random.key_data(leaf))
            kinds.append("key")
        else:
            arrays[f"a{i}"] = np.asarray(leaf)
            kinds.append("array")
    meta_bytes = json.dumps(dict(meta, _leaf_kinds=kinds, _format=2), sort_keys=True, default=float).encode()
    entries: dict[str, Any] = dict(arrays)   # (Any: numpy's stub would match a value to savez's allow_pickle)
    entries[_META_KEY] = np.frombuffer(meta_bytes, np.uint8)
    entries[_DIGEST_KEY] = np.frombuffer(_digest(arrays, meta_bytes).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **entries)
    path = path_for(directory, step)
    atomic_write(path, buf.getvalue(), mode=0o600)  # holds the noise key: owner only
    # keep the newest KEEP checkpoints; remove older ones and temporaries left by a crashed save
    for _, old in list_checkpoints(directory)[KEEP:]:
        _unlink(old)
    for tmp in glob.glob(os.path.join(directory, TEMP_PREFIX + "*")):
        _unlink(tmp)
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def exists(directory: str) -> bool:
    return bool(list_checkpoints(directory)) or (
        os.path.exists(os.path.join(directory, META)) and os.path.exists(os.path.join(directory, NPZ)))


def read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of one checkpoint file, after checking its digest."""
    try:
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many kinds on a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if _META_KEY not in entries or _DIGEST_KEY not in entries:
        raise CheckpointError(f"{path} is not a jaxdp checkpoint (no metadata or digest)")
    meta_bytes = entries.pop(_META_KEY).tobytes()
    digest = entries.pop(_DIGEST_KEY).tobytes().decode("ascii", "replace")
    if _digest(entries, meta_bytes) != digest:
        raise CheckpointError(f"checkpoint {path} fails its integrity check (its arrays or metadata were changed "
                              "after it was written); refusing to resume from it")
    try:
        meta = json.loads(meta_bytes)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: metadata is not JSON ({e})") from None
    return entries, meta


def load(directory: str, template: Any) -> tuple[Any, dict]:
    """Load the newest checkpoint in ``directory`` into the structure of ``template`` (e.g. a freshly
    initialised state). Raises :class:`CheckpointError` (naming the file, and the previous one when there is
    one) if the newest fails its integrity check: a damaged checkpoint is never skipped silently."""
    found = list_checkpoints(directory)
    if not found:
        return _load_legacy(directory, template)
    step, path = found[0]
    try:
        arrays, meta = read(path)
    except CheckpointError as e:
        hint = ""
        if len(found) > 1:
            hint = (f". The previous checkpoint {found[1][1]} (step {found[1][0]}) is kept: move {path} away to "
                    "resume from it (the steps after it are recomputed identically)")
        raise CheckpointError(f"{e}{hint}") from None
    if int(meta.get("step", -1)) != step:
        raise CheckpointError(f"checkpoint {path}: its metadata says step {meta.get('step')}, its name step {step}")
    meta["_path"] = path
    return _unflatten(path, arrays, meta, template), meta


def _unflatten(where: str, arrays: dict, meta: dict, template: Any) -> Any:
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    kinds = meta["_leaf_kinds"]
    if len(t_leaves) != len(kinds):
        raise CheckpointError(f"checkpoint {where} has {len(kinds)} arrays but the model/optimiser has "
                              f"{len(t_leaves)}: the config changed since it was written")
    leaves = []
    for i, (t, kind) in enumerate(zip(t_leaves, kinds)):
        a = arrays[f"a{i}"]
        if kind == "key":
            leaves.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)))
        else:
            if np.shape(t) != a.shape:
                raise CheckpointError(f"checkpoint {where}: array {i} has shape {a.shape}, expected "
                                      f"{np.shape(t)}: the config changed since it was written")
            leaves.append(jax.numpy.asarray(a, dtype=getattr(t, "dtype", a.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _load_legacy(directory: str, template: Any) -> tuple[Any, dict]:
    """The two-file format of earlier versions (``checkpoint.npz`` + ``checkpoint.json``)."""
    meta_path, npz_path = os.path.join(directory, META), os.path.join(directory, NPZ)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(npz_path, "rb") as f:
            data = f.read()
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint in {directory} is unreadable ({e}); it was not modified") from None
    if hashlib.sha256(data).hexdigest() != meta.get("_npz_sha256"):
        raise CheckpointError(f"checkpoint in {directory}: {NPZ} does not match {META} (interrupted write?)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta["_path"] = npz_path
    return _unflatten(directory, arrays, meta, template), meta
