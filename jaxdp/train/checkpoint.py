"""Atomic checkpoints of (params, optimiser state incl. noise RNG state) plus JSON metadata (accountant
history, sampler state, metrics so far). A resumed run continues bit-identically: the noise key of step t is
``fold_in(key, t)`` and the batch of step t is a function of ``(seed, t)``, both restored here.

Files: ``checkpoint.npz`` (array leaves; PRNG keys stored as their key data) and ``checkpoint.json``
(metadata with the SHA-256 of the npz). Each is written to a temporary file and renamed into place, the npz
first, so a crash never leaves a checkpoint whose two halves disagree unnoticed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

NPZ, META = "checkpoint.npz", "checkpoint.json"


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(directory: str, tree: Any, meta: dict) -> None:
    """Save the array pytree ``tree`` and JSON-able ``meta`` atomically into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(tree)
    arrays, kinds = {}, []
    for i, leaf in enumerate(leaves):
        if _is_key(leaf):
            arrays[f"a{i}"] = np.asarray(jax.random.key_data(leaf))
            kinds.append("key")
        else:
            arrays[f"a{i}"] = np.asarray(leaf)
            kinds.append("array")
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    _atomic_write(os.path.join(directory, NPZ), data)
    meta = dict(meta, _leaf_kinds=kinds, _npz_sha256=hashlib.sha256(data).hexdigest())
    _atomic_write(os.path.join(directory, META), json.dumps(meta, indent=1, default=float).encode())


def exists(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, META)) and os.path.exists(os.path.join(directory, NPZ))


def load(directory: str, template: Any) -> tuple[Any, dict]:
    """Load a checkpoint into the structure of ``template`` (e.g. a freshly initialised state)."""
    meta_path, npz_path = os.path.join(directory, META), os.path.join(directory, NPZ)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(npz_path, "rb") as f:
            data = f.read()
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint in {directory} is unreadable ({e}); it was not modified") from None
    if hashlib.sha256(data).hexdigest() != meta.get("_npz_sha256"):
        raise ValueError(f"checkpoint in {directory}: {NPZ} does not match {META} (interrupted write?); "
                         "delete the directory or restore both files")
    import io
    arrays = np.load(io.BytesIO(data))
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(t_leaves) != len(meta["_leaf_kinds"]):
        raise ValueError(f"checkpoint in {directory} has {len(meta['_leaf_kinds'])} arrays but the model/optimiser "
                         f"has {len(t_leaves)}: the config changed since it was written")
    leaves = []
    for i, (t, kind) in enumerate(zip(t_leaves, meta["_leaf_kinds"])):
        a = arrays[f"a{i}"]
        if kind == "key":
            leaves.append(jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)))
        else:
            if np.shape(t) != a.shape:
                raise ValueError(f"checkpoint in {directory}: array {i} has shape {a.shape}, expected "
                                 f"{np.shape(t)}: the config changed since it was written")
            leaves.append(jax.numpy.asarray(a, dtype=getattr(t, "dtype", a.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves), meta
