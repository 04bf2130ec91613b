"""Data-parallel DP-SGD over several devices, with the noise added exactly once.

One logical (Poisson) batch of ``P`` padded examples is split into ``n`` equal contiguous shards, one per device
of a 1-D :class:`jax.sharding.Mesh` (axis ``"data"``). Inside :func:`jax.shard_map` every device computes the
SUM of clipped per-example gradients of its shard with :func:`jaxdp.clipped_grad`, and the sums are combined
with ``psum``:

    S = sum_d S_d = sum_d sum_{i in shard d} m_i * min(1, C / (||g_i|| + 1e-6)) * g_i

which is, up to float summation order, the single-device clipped sum of the whole batch: its L2 sensitivity is
still ``C`` (one example lives on one device). ``S`` leaves the ``shard_map`` replicated, and the optax
transformation (e.g. :func:`jaxdp.dpsgd`, whose first part is :func:`jaxdp.add_noise`) runs once, outside the
``shard_map``, on that replicated value:

    update = (S + N(0, (sigma * C)^2 I)) / E,        E = q * N  (public, global expected batch size)

The noise is therefore ONE draw per logical batch from the optimizer state's key (privacy rule 2): ``jit``
computes replicated values identically on every device (threefry is partitionable, so the draw does not depend
on the sharding), so no device adds noise of its own -- there is no ``sqrt(n)`` times too much noise (n
independent draws) nor ``1/sqrt(n)`` too little (a per-device std divided by n). The multi-device update equals
the single-device update for the same batch and key; ``tests/test_distributed.py`` checks both that and the
noise std ``sigma * C / E`` on 4 forced host devices.

Multi-host: call ``jax.distributed.initialize()`` in every process first; :func:`data_mesh` then spans the
devices of all hosts (``jax.devices()`` is global), and each host feeds its part of the global batch (see
``docs/distributed.md``). Every host must use the same optimizer key so that the replicated noise agrees.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdp import _checks
from jaxdp.clipping import ClipStats, clipped_grad

PyTree = Any
GradFn = Callable[..., tuple[PyTree, ClipStats]]
StepFn = Callable[..., tuple[PyTree, PyTree, ClipStats]]

DATA_AXIS = "data"


# ----------------------------------------------------------------------------------------------------------
# Meshes and batch layout


def data_mesh(devices: Any = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: ``jax.devices()``, all devices of all hosts) with one data axis."""
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devs), (axis_name,))


def _mesh_axis(mesh: Mesh) -> tuple[str, int]:
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"data-parallel DP-SGD needs a 1-D mesh with a single data axis, got axes {mesh.axis_names}; "
            "build one with jaxdp.distributed.data_mesh()")
    name = mesh.axis_names[0]
    return name, int(mesh.shape[name])


def shard_batch(indices: np.ndarray, mask: np.ndarray, num_devices: int, *,
                pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Lay out one global (Poisson) batch as ``num_devices`` equal contiguous shards with padding.

    The real examples (``mask`` True, in their order) are dealt out as evenly as possible: device ``d`` gets
    ``k // n + (d < k % n)`` of the ``k`` real examples, at the front of its shard, then padding (index 0,
    mask False). Each shard has ``ceil(P / n)`` rows, rounded up to ``pad_to_multiple``, where ``P`` is the
    input's padded length, so the output length is a multiple of ``num_devices`` and the number of distinct
    shapes is that of the input sampler. Shard ``d`` is ``out[d * s:(d + 1) * s]`` -- the layout that
    ``NamedSharding(mesh, P("data"))`` splits along. The set of examples (and hence privacy) is unchanged:
    only their placement and the amount of padding differ. An empty batch gives all-padding shards.

    Returns ``(indices [n * s] int32, mask [n * s] bool)``.
    """
    n = _checks.positive_int("num_devices", num_devices)
    m = _checks.positive_int("pad_to_multiple", pad_to_multiple)
    indices = np.asarray(indices)
    mask = np.asarray(mask)
    if indices.ndim != 1 or mask.shape != indices.shape:
        raise ValueError(f"indices and mask must be 1-D of the same length, got {indices.shape} and {mask.shape}")
    real = indices[mask.astype(bool)]
    k = real.size
    per = max(1, -(-indices.size // n), -(-k // n))
    per = -(-per // m) * m
    out_idx = np.zeros((n, per), np.int32)
    out_mask = np.zeros((n, per), bool)
    counts = np.full(n, k // n) + (np.arange(n) < k % n)
    start = 0
    for d, c in enumerate(counts):
        out_idx[d, :c] = real[start:start + c]
        out_mask[d, :c] = True
        start += c
    return out_idx.reshape(-1), out_mask.reshape(-1)


class ShardedSampler:
    """Wrap a sampler (e.g. :class:`jaxdp.PoissonSampler`) so each batch is laid out by :func:`shard_batch`.

    The sampling itself -- and so the accounting (``sample_rate``, ``sampling``, ``expected_batch_size``) -- is
    the wrapped sampler's, which this object forwards; only the layout over devices changes.
    """

    def __init__(self, sampler: Any, num_devices: int, *, pad_to_multiple: int = 1) -> None:
        self.sampler = sampler
        self.num_devices = _checks.positive_int("num_devices", num_devices)
        self.pad_to_multiple = _checks.positive_int("pad_to_multiple", pad_to_multiple)

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        indices, mask = self.sampler.sample(step)
        return shard_batch(indices, mask, self.num_devices, pad_to_multiple=self.pad_to_multiple)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for indices, mask in self.sampler:
            yield shard_batch(indices, mask, self.num_devices, pad_to_multiple=self.pad_to_multiple)

    def __getattr__(self, name: str) -> Any:  # sample_rate, sampling, step, state_dict, ...
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)

    @property
    def step(self) -> int:
        return self.sampler.step

    @step.setter
    def step(self, value: int) -> None:  # `sampler.step += 1` must advance the wrapped sampler (resume state)
        self.sampler.step = value


def process_rows(global_rows: int, mesh: Mesh | None = None) -> slice:
    """The rows of a sharded global batch (length ``global_rows``, e.g. from :func:`shard_batch` with
    ``num_devices = jax.device_count()``) that THIS process's devices hold, as a slice.

    Multi-host: every process draws the same global ``(indices, mask)`` (same sampler seed), loads only
    ``indices[process_rows(P)]`` and passes them to :func:`global_batch`. One process: ``slice(0, P)``.
    """
    mesh = data_mesh() if mesh is None else mesh
    axis, n = _mesh_axis(mesh)
    if global_rows % n:
        raise ValueError(f"global_rows={global_rows} must be a multiple of the device count {n}; "
                         "lay the batch out with shard_batch(indices, mask, num_devices)")
    index_map = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((global_rows,))
    rows = [_checks.present(sl)[0] for sl in index_map.values()]   # every device holds a slice of the rows
    bounds = sorted({(s.start or 0, global_rows if s.stop is None else s.stop) for s in rows})
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        if stop != start:
            raise ValueError("this process's devices do not hold a contiguous block of the data axis; "
                             "build the mesh with data_mesh() (devices ordered by process)")
    return slice(bounds[0][0], bounds[-1][1])


def global_batch(local_batch: PyTree, global_rows: int, mesh: Mesh | None = None) -> PyTree:
    """Assemble this process's rows (``process_rows``) into global arrays sharded along the data axis
    (``jax.make_array_from_process_local_data``); pass the result (and the mask, likewise) to the step."""
    mesh = data_mesh() if mesh is None else mesh
    axis, _ = _mesh_axis(mesh)
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_rows,) + tuple(np.shape(x)[1:])), local_batch)


def _pad_rows(x: Any, pad: int) -> Any:
    if pad == 0:
        return x
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)


# ----------------------------------------------------------------------------------------------------------
# Combining statistics across devices


def _combine_stats(local: ClipStats, axis: str) -> ClipStats:
    """Global :class:`ClipStats` from one device's stats, inside ``shard_map`` (per-example arrays stay local
    and are concatenated by the ``out_specs``; counts are summed; fractions and means are recomputed from
    summed counts, not averaged over devices)."""
    n_real = local.num_examples
    n_nonfinite = local.num_nonfinite
    n_rf_local = (n_real - n_nonfinite).astype(jnp.float32)
    denom_local = jnp.maximum(n_rf_local, 1.0)
    n_rf_global = jnp.maximum(jax.lax.psum(n_rf_local, axis), 1.0)

    def frac(f):  # local fraction -> local count -> global fraction
        return jax.lax.psum(jnp.round(f * denom_local), axis) / n_rf_global

    def mean(mu):  # local mean over real finite examples -> global mean
        return jax.lax.psum(mu * denom_local, axis) / n_rf_global

    return ClipStats(
        per_example_norms=local.per_example_norms,
        per_example_losses=local.per_example_losses,
        clip_fraction=frac(local.clip_fraction),
        num_examples=jax.lax.psum(n_real, axis),
        num_nonfinite=jax.lax.psum(n_nonfinite, axis),
        layer_norm_mean={k: mean(v) for k, v in local.layer_norm_mean.items()},
        layer_norm_max={k: jax.lax.pmax(v, axis) for k, v in local.layer_norm_max.items()},
        group_clip_fraction={k: frac(v) for k, v in local.group_clip_fraction.items()},
        aux=local.aux,
    )


def _stats_specs(axis: str, aux_present: bool) -> ClipStats:
    sharded, repl = P(axis), P()
    # A pytree of PartitionSpecs with ClipStats' structure (not ClipStats values: hence the Any-typed fields).
    specs: dict[str, Any] = dict(per_example_norms=sharded, per_example_losses=sharded, clip_fraction=repl,
                                 num_examples=repl, num_nonfinite=repl, layer_norm_mean=repl, layer_norm_max=repl,
                                 group_clip_fraction=repl, aux=sharded if aux_present else None)
    return ClipStats(**specs)


# ----------------------------------------------------------------------------------------------------------
# The data-parallel clipped sum and the private step


def data_parallel_clipped_grad(grad_fn: GradFn, mesh: Mesh | None = None) -> GradFn:
    """Run a clipped-gradient function (from :func:`jaxdp.clipped_grad`) data-parallel over ``mesh``.

    Returns ``dp_grad_fn(params, batch, mask=None) -> (summed, stats)`` with the same contract as ``grad_fn``:
    ``summed = psum_d grad_fn(params, shard_d)`` is the clipped SUM over the whole batch (replicated on every
    device; no noise, no division) and ``stats`` is the global :class:`ClipStats` (per-example arrays in batch
    order, counts summed, fractions recomputed from the summed counts). The batch's leading axis ``B`` need not
    be a multiple of the device count: it is padded with masked-out rows (which contribute exactly zero).
    ``params`` are replicated. On a one-device mesh this is ``grad_fn`` itself. Jit-able.

    Args:
      grad_fn: ``grad_fn(params, batch, mask) -> (summed, ClipStats)``.
      mesh: a 1-D mesh (default :func:`data_mesh`, all devices).
    """
    mesh = data_mesh() if mesh is None else mesh
    axis, n = _mesh_axis(mesh)
    if n == 1:
        return grad_fn

    def dp_grad_fn(params: PyTree, batch: PyTree, mask: jax.Array | None = None):
        leaves = jax.tree_util.tree_leaves(batch)
        if not leaves:
            raise ValueError("batch is empty: it must be a pytree of arrays with a leading batch axis")
        B = int(np.shape(leaves[0])[0])
        mask = jnp.ones((B,), bool) if mask is None else (jnp.asarray(mask) != 0)
        if mask.shape != (B,):
            raise ValueError(f"mask must have shape [B] = ({B},) to match the batch, got {mask.shape}")
        pad = -B % n
        batch_p = jax.tree_util.tree_map(lambda x: _pad_rows(x, pad), batch)
        mask_p = jnp.concatenate([mask, jnp.zeros((pad,), bool)]) if pad else mask

        def local(p, b, m):
            summed, stats = grad_fn(p, b, m)
            return jax.lax.psum(summed, axis), _combine_stats(stats, axis)

        # out_specs must match the output tree, so learn abstractly whether the stats carry aux.
        per = (B + pad) // n
        shard_shape = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((per,) + tuple(np.shape(x)[1:]), jnp.result_type(x)), batch_p)
        has_aux = jax.eval_shape(grad_fn, params, shard_shape,
                                 jax.ShapeDtypeStruct((per,), jnp.bool_))[1].aux is not None
        sharded = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
            out_specs=(P(), _stats_specs(axis, has_aux)), check_vma=False)
        summed, stats = sharded(params, batch_p, mask_p)
        if pad:
            cut = lambda x: x[:B]  # noqa: E731
            stats = stats._replace(per_example_norms=cut(stats.per_example_norms),
                                   per_example_losses=cut(stats.per_example_losses),
                                   aux=jax.tree_util.tree_map(cut, stats.aux))
        return summed, stats

    return dp_grad_fn


def private_update(grad_fn: GradFn, optimizer: optax.GradientTransformation, mesh: Mesh | None = None, *,
                   jit: bool = True) -> StepFn:
    """One private training step, identical on one device and on ``n``: clip-sum (sharded), noise once, update.

    Returns ``step(params, opt_state, batch, mask=None) -> (new_params, new_opt_state, stats)`` where

        S = data_parallel_clipped_grad(grad_fn, mesh)(params, batch, mask)        # psum of per-device sums
        updates, new_opt_state = optimizer.update(S, opt_state, params)         # noise ONCE, / E, optimiser
        new_params = optax.apply_updates(params, updates)

    ``optimizer`` must take the clipped SUM and start with :func:`jaxdp.add_noise` (e.g. :func:`jaxdp.dpsgd`,
    :func:`jaxdp.dpadam`): its ``expected_batch_size`` is the GLOBAL ``q * N`` (never a per-device value),
    its ``noise_multiplier`` and ``l2_clip_norm`` the global ones. Its noise runs once on the replicated sum, so
    the step's noise std is ``sigma * C / E`` whatever the device count.

    With more than one device in ``mesh`` the batch and mask are placed sharded along the data axis and
    params / optimizer state replicated (``jax.device_put``; free when they already are); on one device the
    step is the plain jitted single-device step. ``jit=False`` returns the unjitted function (for use inside a
    larger jitted program).
    """
    mesh = data_mesh() if mesh is None else mesh
    axis, n = _mesh_axis(mesh)
    dp_grad = data_parallel_clipped_grad(grad_fn, mesh)

    def core(params, opt_state, batch, mask):
        summed, stats = dp_grad(params, batch, mask)
        updates, new_state = optimizer.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), new_state, stats

    if not jit:
        return core
    core_jit = jax.jit(core)
    if n == 1:
        def step1(params, opt_state, batch, mask=None):
            return core_jit(params, opt_state, batch, mask)
        return step1

    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(axis))
    me = jax.process_index()
    n_local = sum(d.process_index == me for d in mesh.devices.flat)
    if n_local < n:  # several processes: each passes only its rows of the global layout
        def step_multi(params, opt_state, batch, mask=None):
            leaf = jax.tree_util.tree_leaves(batch)[0]
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                B = int(leaf.shape[0])  # already a global array (global_batch)
            else:
                rows = int(np.shape(leaf)[0])
                if rows % n_local:
                    raise ValueError(
                        f"process {me}: {rows} local rows is not a multiple of its {n_local} devices; pass the "
                        "rows that jaxdp.distributed.local_batch(indices, mask, load) returns")
                B = rows // n_local * n
                if mask is None:
                    mask = np.ones((rows,), bool)
                batch = global_batch(batch, B, mesh)
                mask = global_batch(np.asarray(mask) != 0, B, mesh)
            params, opt_state = replicate((params, opt_state), mesh)
            new_params, new_state, stats = core_jit(params, opt_state, batch, mask)
            # per-example stats: this process's rows (those of the batch it passed), readable on the host
            stats = stats._replace(per_example_norms=host_local(stats.per_example_norms),
                                   per_example_losses=host_local(stats.per_example_losses),
                                   aux=host_local(stats.aux))
            return new_params, new_state, stats

        return step_multi

    def step(params, opt_state, batch, mask=None):
        B = int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])
        if mask is None:
            mask = np.ones((B,), bool)
        pad = -B % n
        if pad:  # pad on the host side so the batch can be placed sharded; stats are cut back to B below
            batch = jax.tree_util.tree_map(lambda x: np.concatenate([np.asarray(x), np.repeat(
                np.asarray(x)[:1], pad, axis=0)]), batch)
            mask = np.concatenate([np.asarray(mask) != 0, np.zeros((pad,), bool)])
        batch, mask = jax.device_put((batch, mask), data)
        params, opt_state = jax.device_put((params, opt_state), repl)
        new_params, new_state, stats = core_jit(params, opt_state, batch, mask)
        if pad:
            stats = stats._replace(per_example_norms=stats.per_example_norms[:B],
                                   per_example_losses=stats.per_example_losses[:B],
                                   aux=jax.tree_util.tree_map(lambda a: a[:B], stats.aux))
        return new_params, new_state, stats

    return step


def make_private_step(
    loss_fn: Callable[..., Any],
    l2_clip_norm: float | PyTree,
    optimizer: optax.GradientTransformation,
    *,
    method: str = "auto",
    has_aux: bool = False,
    microbatch_size: int | None = None,
    trainable: PyTree | None = None,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> StepFn:
    """``private_update(clipped_grad(loss_fn, l2_clip_norm, ...), optimizer, mesh)``: the whole private step.

    ``loss_fn(params, batch) -> per-example losses [B]``; ``optimizer`` e.g.
    ``jaxdp.dpsgd(lr, l2_clip_norm=C, noise_multiplier=sigma, expected_batch_size=q * N, key=...)`` with the same
    ``l2_clip_norm``. ``mesh=None`` uses every device (``jax.devices()``); with one device nothing is sharded.
    ``microbatch_size`` bounds memory per device (it applies to each device's shard).
    """
    grad_fn = clipped_grad(loss_fn, l2_clip_norm, method, has_aux=has_aux, microbatch_size=microbatch_size,
                           trainable=trainable)
    return private_update(grad_fn, optimizer, mesh, jit=jit)


def local_device_count() -> int:
    """Number of devices attached to THIS process (``jax.local_device_count()``): the devices whose rows of
    the global batch this process loads. With one process it equals :func:`device_count`.

    jaxdp 0.1.0 returned the job's count here; that is now :func:`device_count`.

    Example:
        >>> local_device_count() <= device_count()
        True
    """
    return jax.local_device_count()


def device_count() -> int:
    """Number of devices of the whole job, all processes and hosts together (``jax.device_count()``): the
    devices :func:`data_mesh` spans by default, over which one step's clipped sum is psum-ed before the noise is
    added once.

    Example:
        >>> device_count() == len(data_mesh().devices.ravel())
        True
    """
    return jax.device_count()


# ----------------------------------------------------------------------------------------------------------
# Several processes (jax.distributed): start-up from the environment, process-local data, agreement


_ENV_COORDINATOR = ("JAXDP_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
_ENV_NUM_PROCESSES = ("JAXDP_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_PROCESS_ID = ("JAXDP_PROCESS_ID", "JAX_PROCESS_ID")


def _env_first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def _env_int(found: tuple[str, str] | None) -> int | None:
    if found is None:
        return None
    name, value = found
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Join a multi-process JAX job described by the environment; returns True when this is one of several.

    Read, in order of precedence (jaxdp's own name first, then the variable JAX itself reads):

    * ``JAXDP_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordination service;
    * ``JAXDP_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES``: the number of processes;
    * ``JAXDP_PROCESS_ID`` / ``JAX_PROCESS_ID``: this process's id in ``0 .. num_processes - 1``;
    * ``JAXDP_DISTRIBUTED=auto``: let :func:`jax.distributed.initialize` detect SLURM, Open MPI, a Kubernetes
      indexed Job or a Cloud TPU pod itself (no other variable needed);
    * ``JAXDP_HEARTBEAT_TIMEOUT`` (seconds, default 60): how long the others wait for a silent process before
      they all stop (see ``docs/distributed.md``, failure behaviour).

    None of them set (or one process): nothing happens and False is returned, so single-process runs are
    unchanged. On CPU the cross-process collectives use gloo. Must run before any other JAX call in the
    process (``jaxdp train`` does this itself); calling it again after a successful start is a no-op.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coord = _env_first(environ, _ENV_COORDINATOR)
    num = _env_int(_env_first(environ, _ENV_NUM_PROCESSES))
    pid = _env_int(_env_first(environ, _ENV_PROCESS_ID))
    auto = environ.get("JAXDP_DISTRIBUTED", "").strip().lower()
    if auto not in ("", "auto", "0", "off"):
        raise ValueError(f"JAXDP_DISTRIBUTED={environ['JAXDP_DISTRIBUTED']!r}: use 'auto' (cluster detection) or "
                         "unset it")
    if coord is None and num is None and pid is None and auto != "auto":
        return False
    if num == 1 and auto != "auto":
        return False
    try:
        heartbeat = int(environ.get("JAXDP_HEARTBEAT_TIMEOUT", "60"))
    except ValueError:
        raise ValueError(f"JAXDP_HEARTBEAT_TIMEOUT={environ['JAXDP_HEARTBEAT_TIMEOUT']!r} must be whole "
                         "seconds") from None
    if auto != "auto":
        missing = [names[0] for names, v in ((_ENV_COORDINATOR, coord), (_ENV_NUM_PROCESSES, num),
                                             (_ENV_PROCESS_ID, pid)) if v is None]
        if missing:
            raise ValueError(f"multi-process run: {', '.join(missing)} not set; set all three of JAXDP_COORDINATOR "
                             "(host:port of process 0), JAXDP_NUM_PROCESSES and JAXDP_PROCESS_ID, or "
                             "JAXDP_DISTRIBUTED=auto on SLURM / Kubernetes / TPU pods")
        num, pid = _checks.present(num), _checks.present(pid)   # not missing
        if num < 1 or not 0 <= pid < num:
            raise ValueError(f"JAXDP_PROCESS_ID={pid} must be in 0..{num - 1} (JAXDP_NUM_PROCESSES={num})")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 -- an older/newer JAX without the option: its default applies
        pass
    if auto == "auto" and coord is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    else:
        jax.distributed.initialize(coordinator_address=_checks.present(coord)[1], num_processes=num, process_id=pid,
                                   heartbeat_timeout_seconds=heartbeat)
    return jax.process_count() > 1


def process_index() -> int:
    """This process's id (0 on a single process)."""
    return jax.process_index()


def process_count() -> int:
    """The number of processes in the job (1 without ``jax.distributed``)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that performs side effects (ledger, ``metrics.json``, checkpoints, logs).

    Every process computes the same replicated update, accountant and metrics; only process 0 writes them so
    that nothing is recorded twice (one ledger commit per run, one file per output)."""
    return jax.process_index() == 0


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
    """Place ``tree`` replicated on every device of ``mesh`` (all processes' devices by default).

    Each process passes its own, identical, copy (e.g. params initialised from the shared seed, or the
    optimiser state holding the shared noise key). PRNG key leaves are placed through their key data (JAX
    cannot place typed keys on devices of other processes directly). Leaves already so placed are kept."""
    mesh = data_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == repl:
            return x
        if _is_key(x):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), repl),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, repl)

    return jax.tree_util.tree_map(put, tree)


def host_local(tree: PyTree) -> PyTree:
    """This process's view of global arrays: a replicated array becomes its local copy (on one local device),
    a data-sharded array the concatenation of this process's rows (in order). Other leaves pass unchanged.

    Use it to read per-example statistics (the rows of this process's shard) or to evaluate replicated params
    locally without cross-process work."""
    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        shards = sorted(x.addressable_shards, key=lambda s: tuple(i.start or 0 for i in s.index))
        seen, parts = set(), []
        for sh in shards:  # replicas of the same rows appear once
            k = tuple((i.start, i.stop) for i in sh.index)
            if k not in seen:
                seen.add(k)
                parts.append(np.asarray(sh.data))
        return np.concatenate(parts, axis=0) if parts else np.zeros((0,) + x.shape[1:], x.dtype)

    return jax.tree_util.tree_map(local, tree)


def local_batch(indices: np.ndarray, mask: np.ndarray, load: Callable[[np.ndarray], PyTree],
                mesh: Mesh | None = None) -> tuple[PyTree, np.ndarray]:
    """This process's part of one global batch: ``(load(rows' indices), rows' mask)``.

    ``(indices, mask)`` is the GLOBAL padded batch of one step (e.g. ``PoissonSampler.sample(t)``), the same on
    every process because every process draws it from the same seed. It is laid out over all devices of all
    processes with :func:`shard_batch` (real examples dealt out evenly, padding after them), and this process
    keeps only the rows its devices hold (:func:`process_rows`): ``load`` is called with those indices only,
    so no process loads (or needs) the examples of another process's shard. Padding rows load index 0 and
    have mask False (they contribute exactly zero). With one process this is the whole batch laid out over
    the local devices. Pass the result to :meth:`jaxdp.PrivateTraining.step` (or to :func:`global_batch`).
    """
    mesh = data_mesh() if mesh is None else mesh
    _, n = _mesh_axis(mesh)
    idx, msk = shard_batch(indices, mask, n)
    rows = process_rows(idx.size, mesh)
    return load(idx[rows]), msk[rows]


def _digest(value: Any) -> np.ndarray:
    import hashlib
    import json
    h = hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).digest()
    return np.frombuffer(h[:16], np.int32).copy()


def all_equal(value: Any) -> bool:
    """True when ``value`` (anything JSON-able, compared through a hash) is the same on every process.
    A collective: every process must call it at the same point. Trivially True on one process."""
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils
    mine = _digest(value)
    every = np.asarray(multihost_utils.process_allgather(mine))
    return bool(np.all(every == every[0]))


def check_same_on_all_processes(value: Any, what: str) -> None:
    """Raise ``ValueError`` (on every process) unless ``value`` is identical on all of them.

    Used for what data parallelism relies on: the sampler seed (so every process draws the same global
    batch), the noise key (so the replicated noise is one draw), and the mechanism's parameters."""
    if not all_equal(value):
        raise ValueError(f"process {jax.process_index()}: {what} differs between the {jax.process_count()} "
                         "processes; every process must run the same config with the same seed")


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (a collective; ``flag`` on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32)))
    return bool(every.any())


def process_sum(*values: float) -> tuple[float, ...]:
    """Sum host scalars over all processes (a collective; the values themselves on one process)."""
    if jax.process_count() == 1:
        return tuple(float(v) for v in values)
    from jax.experimental import multihost_utils
    bits = np.asarray(values, np.float64).view(np.int32)  # gathered bit-exactly (no float64 on device needed)
    every = np.asarray(multihost_utils.process_allgather(bits)).astype(np.int32).reshape(jax.process_count(), -1)
    sums = every.copy().view(np.float64).sum(axis=0)
    return tuple(float(v) for v in sums)


def broadcast_from_main(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON-able) on every process: e.g. the run id process 0 settled.

    A collective: every process must call it at the same point. On one process ``value`` is returned as is."""
    if jax.process_count() == 1:
        return value
    import json
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32) if is_main_process() else None
    size = int(np.asarray(multihost_utils.broadcast_one_to_all(
        np.asarray([0 if data is None else data.size], np.int32)))[0])
    buf = data if data is not None else np.zeros(size, np.int32)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)
    return json.loads(got.tobytes().decode())


class OtherProcessFailed(ValueError):
    """Raised on every other process when a step that only process 0 performs (e.g. the ledger check) failed."""


def on_main_process(fn: Callable[[], Any], what: str) -> Any:
    """Run the side effect ``fn()`` on process 0 only, and make every process agree on its outcome.

    Returns ``fn()``'s result on process 0 and None on the others. If it raises on process 0, process 0
    re-raises it and every other process raises :class:`OtherProcessFailed`, so all stop together instead of
    the others waiting in the next collective. A collective: every process must call it at the same point."""
    err, out = None, None
    if is_main_process():
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised below, after the others are told
            err = e
    if any_process(err is not None):
        if err is not None:
            raise err
        raise OtherProcessFailed(f"process {jax.process_index()}: stopping because {what} failed on process 0 "
                                 "(its error is in process 0's output)")
    return out


__all__ = ["DATA_AXIS", "data_mesh", "shard_batch", "ShardedSampler", "process_rows", "global_batch",
           "data_parallel_clipped_grad", "private_update", "make_private_step", "local_device_count", "device_count",
           "initialize_from_env", "process_index", "process_count", "is_main_process", "replicate", "host_local",
           "local_batch", "all_equal", "check_same_on_all_processes", "any_process", "process_sum",
           "broadcast_from_main", "on_main_process", "OtherProcessFailed"]
