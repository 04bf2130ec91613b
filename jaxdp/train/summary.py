"""The run record: ``metrics.json`` of a ``jaxdp train`` run directory, as one typed, frozen :class:`RunSummary`.

:class:`RunSummary` is the ONLY writer (:meth:`RunSummary.write`, atomic) and the ONLY reader
(:meth:`RunSummary.read`) of ``metrics.json``. The trainer writes it; ``jaxdp report`` (model card, plots) and
``jaxdp audit --run`` read it. Every privacy statement they make about a run comes from this record (privacy
rule 10, ``docs/privacy.md``), so the reader follows two rules:

* **Not recorded is None, never a default.** A key a file lacks (a file written before that key existed) reads
  as ``None``; the report then says "not recorded" instead of guessing. ``tests/data/metrics_v0.json`` is a file
  of the first format, read by the tests.
* **A damaged file is an error that names the file and the field.** A value of the wrong type or outside its
  range (a negative delta, a sample rate of 2, ``"steps": "twelve"``), a file that is not JSON or not an
  object, or a file from a newer format raises :class:`RunSummaryError` (a ``ValueError``: the command line
  prints one line and exits with status 2).

Keys the reader does not know are ignored (a file of the same format version never has any).

Example:
  >>> s = RunSummary(dp=True, epsilon=1.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.01, steps=100,
  ...                sampling="poisson", accountant="prv", neighboring_relation="add_remove")
  >>> RunSummary.from_dict(s.to_dict()) == s
  True
  >>> RunSummary.from_dict({"dp": True, "epsilon": 1.5}).neighboring_relation is None   # not recorded
  True
  >>> try:
  ...     RunSummary.from_dict({"delta": -1.0}, source="m.json")
  ... except RunSummaryError as e:
  ...     print(str(e).split(" (")[0])
  m.json: field 'delta' must be a number in [0, 1) or null, got -1.0
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any
from collections.abc import Mapping

FILE = "metrics.json"
FORMAT_VERSION = 1   # files written before the version was recorded read as format 1 (they have the same keys)

MECHANISMS = ("dpsgd", "bandmf", "blt")   # what a record may name as its noise mechanism


class RunSummaryError(ValueError):
    """``metrics.json`` is damaged (or from a newer jaxdp): ``path`` and ``field`` say where."""

    def __init__(self, path: str, field: str | None, problem: str) -> None:
        where = f"field {field!r} " if field else ""
        super().__init__(f"{path}: {where}{problem}")
        self.path, self.field = path, field


# -- field checks ----------------------------------------------------------------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_DAMAGED = " (the run record is damaged; re-run `jaxdp train` with --fresh, or restore the file)"


def _check(value: Any, kind: str, src: str, field: str) -> Any:
    """``value`` converted to ``kind`` (None stays None), or :class:`RunSummaryError`."""
    if value is None:
        return None

    def bad(want: str) -> RunSummaryError:
        return RunSummaryError(src, field, f"must be {want} or null, got {value!r}{_DAMAGED}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in ("int", "count"):
        if not _number(value) or not math.isfinite(value) or float(value) != int(value) or \
                (kind == "count" and value < 0):
            raise bad("an integer >= 0" if kind == "count" else "an integer")
        return int(value)
    if kind == "map":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping")
        return _unstrict(dict(value))
    if kind == "numbers":   # {name: number}
        value = _unstrict(value)
        if not isinstance(value, dict) or not all(isinstance(k, str) and _number(x) for k, x in value.items()):
            raise bad("a mapping of names to numbers")
        return {k: float(x) for k, x in value.items()}
    # numbers with a range; the file spells a non-finite number as a string (strict JSON has no NaN / Infinity)
    if isinstance(value, str) and value in _NONFINITE:
        value = float(value)
    if not _number(value):
        raise bad({"float": "a number", "nonneg": "a number >= 0", "prob": "a number in [0, 1]",
                   "delta": "a number in [0, 1)", "rate": "a number in (0, 1]"}[kind])
    v = float(value)
    ok = {"float": True, "nonneg": v >= 0, "prob": 0 <= v <= 1, "delta": 0 <= v < 1, "rate": 0 < v <= 1}[kind]
    if not ok:
        raise bad({"nonneg": "a number >= 0", "prob": "a number in [0, 1]", "delta": "a number in [0, 1)",
                   "rate": "a number in (0, 1]"}[kind])
    return v


_NONFINITE = ("nan", "inf", "-inf")


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float spelled ``"nan"`` / ``"inf"`` / ``"-inf"``: ``metrics.json`` is strict
    RFC 8259 JSON (which has no NaN or Infinity, so other tools can read it), and :meth:`RunSummary.read` reads
    those strings back as the numbers (a diverged run's NaN loss stays NaN, not "not recorded")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _unstrict(value: Any) -> Any:
    """The inverse of :func:`_strict` inside a mapping read from the file."""
    if isinstance(value, str) and value in _NONFINITE:
        return float(value)
    if isinstance(value, dict):
        return {k: _unstrict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unstrict(v) for v in value]
    return value


def _fields(cls) -> dict[str, str]:
    return {f.name: f.metadata["kind"] for f in dataclasses.fields(cls)}


def _f(kind: str, default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata={"kind": kind})


# -- the record ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One row of ``metrics.json``'s ``epochs``: the state at the end of an epoch. Clipping statistics are
    ``None`` for a non-private run; ``clip_norm`` (``C_t``) is recorded by adaptive clipping only."""

    epoch: int | None = _f("count")
    step: int | None = _f("count")
    train_loss: float | None = _f("float")
    test_accuracy: float | None = _f("prob")
    epsilon: float | None = _f("nonneg")           # spent at the epoch's end; None: infinite (no noise)
    seconds: float | None = _f("nonneg")
    clip_fraction: float | None = _f("prob")
    clip_norm: float | None = _f("nonneg")
    group_clip_fraction: dict | None = _f("numbers")
    layer_grad_norm_mean: dict | None = _f("numbers")

    _ALWAYS = ("epoch", "step", "train_loss", "test_accuracy", "epsilon", "seconds")  # written even when None

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>", where: str = "epochs") -> EpochRecord:
        if not isinstance(d, dict):
            raise RunSummaryError(source, where, f"must be an object, got {d!r}{_DAMAGED}")
        return cls(**{k: _check(d.get(k), kind, source, f"{where}.{k}") for k, kind in _fields(cls).items()})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _fields(type(self))
                if k in self._ALWAYS or getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a ``jaxdp train`` run did and what it can claim: ``metrics.json``.

    Every field is ``None`` when the run did not record it (an older file, or a field that does not apply:
    ``bands`` outside BandMF, ``target_epsilon`` of a run without a target, clipping fields of a non-private
    run). ``epsilon`` is ``None`` also for a run whose epsilon is infinite (noise multiplier 0, non-private);
    ``dp`` tells the two apart.

    Privacy meaning: ``epsilon`` is the accountant's (``accountant``) epsilon for ``steps`` steps of the mechanism
    (``mechanism``, ``sampling`` at ``sample_rate`` / ``expected_batch_size``, ``noise_multiplier``, clip norm
    ``max_grad_norm``) at ``delta``, under the ``neighboring_relation``.
    """

    run_id: str | None = _f("str")
    status: str | None = _f("str")                       # finished | budget_exhausted | running | not started
    dp: bool | None = _f("bool")
    dataset: str | None = _f("str")
    training_set_size: int | None = _f("count")
    model: str | None = _f("str")
    seed_source: str | None = _f("str")                  # "config" (pinned) or "os" (drawn, kept secret)
    epsilon: float | None = _f("nonneg")
    delta: float | None = _f("delta")
    delta_at_least_one_over_n: bool | None = _f("bool")
    target_epsilon: float | None = _f("nonneg")
    noise_multiplier: float | None = _f("nonneg")
    max_grad_norm: float | None = _f("nonneg")           # sensitivity of the clipped sum (||(C_1..C_K)||)
    per_layer_clip_norms: dict | None = _f("numbers")
    adaptive_clipping: dict | None = _f("map")
    sample_rate: float | None = _f("rate")
    expected_batch_size: float | None = _f("nonneg")
    steps: int | None = _f("count")
    planned_steps: int | None = _f("count")
    sampling: str | None = _f("str")                     # poisson | shuffle | cyclic_poisson | fixed_order
    accountant: str | None = _f("str")
    neighboring_relation: str | None = _f("str")
    mechanism: str | None = _f("str")                    # one of MECHANISMS
    bands: int | None = _f("count")                      # BandMF
    buffers: int | None = _f("count")                    # BLT
    min_separation: int | None = _f("count")             # BLT: steps between an example's participations (b)
    horizon: int | None = _f("count")                    # BLT: planned steps H the noise was scaled for
    clipping_method: str | None = _f("str")
    config_hash: str | None = _f("str")
    jaxdp_version: str | None = _f("str")
    final_test_accuracy: float | None = _f("prob")
    epochs: tuple[EpochRecord, ...] | None = dataclasses.field(default=None, metadata={"kind": "epochs"})
    format_version: int | None = _f("count", FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.mechanism is not None and self.mechanism not in MECHANISMS:
            raise RunSummaryError("<RunSummary>", "mechanism", f"must be one of {MECHANISMS} or null, "
                                                               f"got {self.mechanism!r}")
        if self.epochs is not None and not isinstance(self.epochs, tuple):
            object.__setattr__(self, "epochs", tuple(self.epochs))

    # -- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> RunSummary:
        """The record of a ``metrics.json`` object; ``source`` names it in errors. Missing keys are ``None``."""
        if isinstance(d, RunSummary):
            return d
        if not isinstance(d, Mapping):
            raise RunSummaryError(source, None, f"must hold a JSON object, got {type(d).__name__}{_DAMAGED}")
        version = _check(d.get("format_version"), "count", source, "format_version")
        if version is not None and version > FORMAT_VERSION:
            raise RunSummaryError(source, "format_version", f"is {version}: written by a newer jaxdp than this "
                                  f"one (which reads format {FORMAT_VERSION}); upgrade jaxdp to read it")
        values: dict[str, Any] = {}
        for k, kind in _fields(cls).items():
            if k == "epochs":
                rows = d.get("epochs")
                if rows is not None and not isinstance(rows, list):
                    raise RunSummaryError(source, "epochs", f"must be a list or null, got {rows!r}{_DAMAGED}")
                values[k] = None if rows is None else tuple(
                    EpochRecord.from_dict(r, source, f"epochs[{i}]") for i, r in enumerate(rows))
            elif k == "format_version":
                values[k] = version
            else:
                values[k] = _check(d.get(k), kind, source, k)
        mech = values["mechanism"]
        if mech is not None and mech not in MECHANISMS:
            raise RunSummaryError(source, "mechanism", f"must be one of {', '.join(MECHANISMS)} or null, got "
                                  f"{mech!r} (a mechanism this jaxdp cannot describe)")
        return cls(**values)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunSummary:
        """The record of a run directory (its ``metrics.json``) or of a ``metrics.json`` path.

        Raises:
          FileNotFoundError: there is no ``metrics.json`` (not a ``jaxdp train`` run directory, or the run has
            not written it yet).
          RunSummaryError: the file is not JSON, not an object, or a field has a wrong type or value.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: give a run directory written by `jaxdp train`")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            d = json.loads(text)
        except ValueError as e:
            raise RunSummaryError(path, None, f"is not valid JSON ({e}){_DAMAGED}") from None
        return cls.from_dict(d, source=path)

    @classmethod
    def coerce(cls, record: RunSummary | Mapping[str, Any]) -> RunSummary:
        """``record`` as a :class:`RunSummary` (a dict in the ``metrics.json`` format is read and checked)."""
        return record if isinstance(record, RunSummary) else cls.from_dict(record)

    # -- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The ``metrics.json`` object (JSON-ready). ``buffers``, ``min_separation``, ``horizon`` (BLT),
        ``per_layer_clip_norms`` and ``adaptive_clipping`` appear only when set, as the trainer always wrote them."""
        out: dict[str, Any] = {}
        for k in _fields(type(self)):
            v = getattr(self, k)
            if k == "epochs":
                out[k] = None if v is None else [r.to_dict() for r in v]
            elif k in ("per_layer_clip_norms", "adaptive_clipping", "buffers", "min_separation",
                       "horizon") and v is None:
                continue
            else:
                out[k] = v
        return out

    def write(self, out_dir: str | os.PathLike) -> str:
        """Write ``out_dir/metrics.json`` atomically (a reader sees the old record or the new one), in the current
        format (``format_version``); returns its path."""
        from jaxdp._io import atomic_write
        path = os.path.join(os.fspath(out_dir), FILE)
        text = json.dumps(_strict(dict(self.to_dict(), format_version=FORMAT_VERSION)), indent=1, allow_nan=False)
        atomic_write(path, text)
        return path

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def private(self) -> bool:
        """The run was trained with DP (``dp`` recorded true)."""
        return self.dp is True

    @property
    def epochs_run(self) -> int:
        """Epochs recorded (0 when none, or when the record has no ``epochs``)."""
        return len(self.epochs or ())

    def replace(self, **changes: Any) -> RunSummary:
        """A copy with ``changes`` (checked like a file's values)."""
        d = self.to_dict()
        d.update(changes)
        return RunSummary.from_dict(d, source="<RunSummary.replace>")


__all__ = ["RunSummary", "EpochRecord", "RunSummaryError", "FILE", "FORMAT_VERSION", "MECHANISMS"]
