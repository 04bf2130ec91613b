"""Reading and writing an ``nnx.Variable``'s value across the flax versions jaxdp supports (``flax>=0.10``):
``get_value`` / ``set_value`` where they exist (``.value`` is deprecated from flax 0.12), ``.value`` before."""
from __future__ import annotations

from typing import Any


def get(v: Any) -> Any:
    """The value held by the Variable ``v``."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def put(v: Any, x: Any) -> None:
    """Set the value held by the Variable ``v`` to ``x``."""
    if hasattr(v, "set_value"):
        v.set_value(x)
    else:
        v.value = x
