"""Per-example gradient norms without per-example gradients ("ghost norms") and book-keeping clipped sums.

Why: ``vmap(grad)`` materialises one gradient per example, ``B * |params|`` floats, and turns every weight
gradient (one big matrix product) into ``B`` small outer products. For a layer ``y = a W`` the per-example
gradient is ``a^T g`` (``g = dL/dy``), so its squared norm is available without forming it
(Goodfellow 2015; Li et al. 2021, "ghost clipping"):

    2-D input  (a: [d], g: [p]):        ||a^T g||_F^2 = ||a||^2 ||g||^2
    sequence   (A: [T, d], G: [T, p]):  ||A^T G||_F^2 = <A A^T, G G^T>          (cost T^2 (d + p))
    embedding  (ids: [T], G: [T, p]):   ||sum_t e_{id_t} g_t^T||^2 = sum_{t,s} [id_t = id_s] <g_t, g_s>
    convolution: the sequence formula on the unfolded input patches (A: [T = output positions, c_in k_h k_w]).

The clipped sum is then formed by book-keeping (Bu et al. 2023): ``sum_i w_i A_i^T G_i = (w * A)^T G``,
ONE matrix product per layer with the clip weights ``w_i`` folded into the stored activations, and no second
backward pass. (A second backward pass of the weighted loss ``sum_i w_i L_i`` was measured as well and is
slower on CPU, and it cannot take per-layer weights; see ``docs/speed.md``.)

How the layers are found: the per-example loss is traced to a jaxpr once (at trace time, so it works for
any pure ``loss_fn(params, batch)`` -- plain JAX, Flax Linen ``apply``, Flax NNX ``merge``), and every use of
every trainable leaf is classified. A leaf is handled by a ghost norm when it is used exactly once, through
norm-preserving reshapes (transpose / reshape / dtype conversion), as the weight operand of a
``dot_general`` without batch dimensions, the kernel of a ``conv_general_dilated`` without feature groups, or
the table of a row ``gather`` (an embedding lookup). A 2-D leaf used at SEVERAL such dot / gather sites (GPT-2's
tied embedding: gathered by token id and used as the output head ``h @ E^T``; or one weight shared by two layers)
has one ghost norm over all its sites' positions together, cross-site Gram terms included (:class:`_Tied`). Every
other leaf -- biases and scales (cheap), or any op not listed -- falls back to materialising per-example gradients
for THAT leaf alone, inside the same backward pass. We chose jaxpr tracing over Flax method interception because
it needs no knowledge of the model library, sees through ``jit``-wrapped helpers, and cannot miss a use of a
parameter (a missed use would under-estimate a norm and break DP).

Control flow. Nested ``jit`` is inlined. ``lax.scan``: a leaf scanned over (stacked per-layer weights
``[L, ...]``, the ``nnx.scan`` pattern) is ``L`` ghost sites, ``W[l]``'s norm bounded and certified per
(example, layer); a leaf that is a constant of the body (shared by all iterations, an RNN's weight) has the
per-example gradient ``sum_l A_l^T G_l``, whose ghost norm is the sequence formula over all ``L T`` positions
(cross-iteration Gram terms included), with the same error bound and exact fallback. The scan is rebuilt with
the same length, direction and unroll, the probes as extra scanned inputs and the activations as extra stacked
outputs. ``jax.checkpoint`` / ``nnx.remat`` is re-bound with the user's ``policy`` and ``prevent_cse`` (the
sites' activations and probes, ``O(T (d + p))`` per example, are its only extra outputs). ``custom_vjp`` /
``custom_jvp`` whose primal holds a recognised layer: the primal is differentiated instead of the custom rule
(warned once, naming the function; ``method="vmap"`` applies the rule). Not handled, exact fallback with ONE
warning naming the parameter and the reason: ``while_loop``, ``cond``, a scan nested in a scan, a leaf in a
scan's carry, a leaf reshaped before it is scanned over, a leaf-derived value returned by a scan and used.

The backward pass itself is the ordinary one, vmapped over examples, with a zero "probe" added to the output
of each ghost layer: the gradient with respect to the probe is the output gradient ``g``; the activations are
recorded on the way forward. The result equals ``vmap(grad)`` up to float rounding (tests: 1e-5).

``method="ghost"`` always uses the ghost formula for the recognised layers; ``method="auto"`` chooses per layer
between the ghost formula and materialising that layer's per-example gradient inside the vmapped backward pass
(a cost rule, :func:`_prefer_materialise`: materialise when the ghost norm's ``T^2 (d + p)`` extra
multiply-adds exceed a measured multiple of ``|W| = d p``, smallest layers first while ALL the materialised
per-example gradients, ``B sum |W|`` floats, fit in 256 MiB; ``T = 1`` layers always use the ghost norm) and
uses plain vmap when no recognised layer is left as a ghost layer. A ghost norm is used when its rounding bound
pins it within 2^-17 (relative) of the exact norm, else that example is materialised; under ``auto``, on the
layers it would materialise but cannot within the budget, within 2^-8 (:func:`backend` sets any tolerance).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jaxdp import _checks
from jaxdp import per_example as pe

_CHAIN = frozenset({"transpose", "reshape", "convert_element_type", "squeeze", "copy", "copy_p"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_SITES = frozenset({"dot_general", "conv_general_dilated", "gather"})
_REMAT = frozenset({"checkpoint", "remat", "remat2"})
_CUSTOM = frozenset({"custom_vjp_call", "custom_jvp_call", "custom_vjp_call_jaxpr"})
_FLOW = {"while": "used inside lax.while_loop / fori_loop", "cond": "used inside lax.cond / switch"}


@dataclass(frozen=True)
class _Derived:
    """A value that is a norm-preserving reshape of trainable leaf ``leaf`` (``chain`` = the eqns applied).

    Inside a ``scan`` body, ``scan`` is that scan's equation and ``mode`` says how the leaf enters it:
    ``"stacked"`` (scanned over: the body sees the slice ``W[l]``) or ``"shared"`` (a constant of the body: the
    same ``W`` in every iteration). ``poison`` marks a value that left a scan (a reason string): any use of it is
    unhandled (the leaf falls back to the exact path)."""

    leaf: int
    chain: tuple = ()
    scan: Any = None
    mode: str | None = None
    poison: str | None = None


@dataclass
class _Site:
    kind: str          # "dot" | "conv" | "gather"
    eqn: Any           # the consuming equation
    pos: int           # operand position of the parameter
    chain: tuple       # eqns from the leaf to the operand
    out_shape: tuple
    out_dtype: Any
    act_shape: tuple   # per-example shape of the other operand (activation / indices)
    path: tuple = ()   # enclosing scan / remat / custom-derivative equations, outermost first
    mode: str | None = None   # None, or "stacked" / "shared" for a site inside a scan body (see _Derived)
    length: int = 1    # the scan's length L (mode "stacked" / "shared"); out_shape and act_shape are per iteration


def _base(site: _Site) -> _Site:
    """The site as one iteration sees it (a stacked site's per-layer formulas)."""
    return _Site(site.kind, site.eqn, site.pos, site.chain, site.out_shape, site.out_dtype, site.act_shape)


def _probe_shape(site: _Site) -> tuple:
    return ((site.length,) if site.mode else ()) + site.out_shape


@dataclass
class _Tied:
    """A 2-D leaf ``[V, D]`` used at several recognised sites outside any scan / remat / custom rule: GPT-2's token
    embedding (a row ``gather`` by token id AND the output head ``h @ E^T``), or one weight shared by two layers.
    Its per-example gradient is the sum of the sites' gradients; each site's is ``sum_t u_t v_t^T`` with
    ``u_t`` on leaf axis 0 (a one-hot row of a gather; the activation or the output gradient of a dot, by its
    orientation) and ``v_t`` on axis 1, so the squared norm is the sequence formula over ALL the sites' positions
    together, cross-site Gram terms included. ``u_is_act[k]``: site ``k`` (a dot) puts its activation on axis 0."""

    sites: tuple
    u_is_act: tuple
    path: tuple = ()
    mode: str | None = None
    kind: str = "tied"

    @property
    def out_dtype(self):
        return self.sites[0].out_dtype


def _tie(sites: list, w_shape: tuple):
    """The :class:`_Tied` of a leaf's several sites, or ``None`` when the combined formula does not apply (the
    leaf then takes the exact path): a 2-D leaf, every site a dot (one contracted weight axis, no batch axes) or a
    row gather, reached through transposes and dtype conversions only, none inside a scan, remat or custom rule."""
    if len(w_shape) != 2:
        return None
    flags = []
    for site in sites:
        if site.mode is not None or site.path or site.kind not in ("dot", "gather"):
            return None
        axes = [0, 1]
        for e in site.chain:
            name = e.primitive.name
            if name == "transpose":
                axes = [axes[j] for j in e.params["permutation"]]
            elif name not in ("convert_element_type", "copy", "copy_p"):
                return None
        if site.kind == "gather":
            if axes != [0, 1]:
                return None
            flags.append(False)
            continue
        (lc, rc), _ = site.eqn.params["dimension_numbers"]
        w_contract = rc if site.pos == 1 else lc
        if len(site.eqn.invars[site.pos].aval.shape) != 2 or len(w_contract) != 1:
            return None
        flags.append(axes[w_contract[0]] == 0)   # the activation pairs with the contracted axis
    return _Tied(tuple(sites), tuple(flags))


def _site_of(g, eqn):
    """Index of the site of ghost entry ``g`` (a :class:`_Site` or :class:`_Tied`) consumed by ``eqn``, else None."""
    if isinstance(g, _Tied):
        return next((k for k, s in enumerate(g.sites) if s.eqn is eqn), None)
    return 0 if g.eqn is eqn else None


@dataclass
class _Analysis:
    sites: dict = field(default_factory=dict)   # leaf -> list[_Site]
    bad: dict = field(default_factory=dict)     # leaf -> reason: leaves with an unrecognised use
    flow: dict = field(default_factory=dict)    # leaf -> reason: unhandled control flow (said once, by name)


class _Eval:
    """Evaluation context: adds probes to ghost sites and records their activations."""

    def __init__(self, ghost: dict, probes: dict):
        self.ghost = ghost      # leaf -> _Site
        self.probes = probes    # leaf -> probe array (zeros) or None in analysis
        self.acts: dict = {}


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _site_kind(eqn, pos: int, invals, dins) -> str | None:
    """Which ghost formula applies when operand ``pos`` (a parameter) is consumed by ``eqn``, if any."""
    name = eqn.primitive.name
    others = [d for i, d in enumerate(dins) if i != pos]
    if any(d is not None for d in others):
        return None
    if name == "dot_general" and len(dins) == 2:
        (_, _), (lb, rb) = eqn.params["dimension_numbers"]
        return "dot" if not lb and not rb else None
    if name == "conv_general_dilated" and pos == 1:
        p = eqn.params
        return "conv" if p["feature_group_count"] == 1 and p["batch_group_count"] == 1 else None
    if name == "gather" and pos == 0:
        dn = eqn.params["dimension_numbers"]
        operand, idx = invals
        if (jnp.ndim(operand) == 2 and tuple(dn.collapsed_slice_dims) == (0,)
                and tuple(dn.start_index_map) == (0,) and not tuple(dn.operand_batching_dims)
                and tuple(dn.offset_dims) == (jnp.ndim(idx) - 1,) and jnp.shape(idx)[-1] == 1
                and tuple(eqn.params["slice_sizes"]) == (1, jnp.shape(operand)[1])):
            return "gather"
    return None


def _run(jaxpr, consts, args, dargs, ctx, path: tuple = ()):
    """Evaluate ``jaxpr``; ``dargs[i]`` tags inputs derived from parameters. Returns (outs, out tags).

    ``ctx`` is an :class:`_Analysis` (record every use of every leaf) or an :class:`_Eval` (add probes at the
    chosen ghost sites and record their activations). Control flow: nested ``jit`` is inlined; ``scan``,
    ``checkpoint`` / ``remat`` and ``custom_vjp`` / ``custom_jvp`` are entered (see the handlers below);
    ``while`` and ``cond`` are unhandled. ``path`` is the tuple of enclosing scan / remat / custom equations."""
    env, denv = {}, {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, d in zip(jaxpr.invars, args, dargs):
        env[v] = a
        if d is not None:
            denv[v] = d
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        dins = [None if isinstance(v, jcore.Literal) else denv.get(v) for v in eqn.invars]
        douts = [None] * len(eqn.outvars)
        name = eqn.primitive.name
        if all(d is None for d in dins):
            outs = _bind(eqn, invals)
        elif any(d is not None and d.poison for d in dins):
            for d in dins:
                if d is not None:
                    ctx_bad(ctx, d.leaf, d.poison or "used together with a value returned from a scan", flow=True)
            outs = _bind(eqn, invals)
        elif name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(inner, jcore.ClosedJaxpr):
                outs, douts = _run(inner.jaxpr, inner.consts, invals, dins, ctx, path)
            else:
                outs, douts = _run(inner, [], invals, dins, ctx, path)
        elif name in _CHAIN and len(eqn.invars) == 1:
            outs = _bind(eqn, invals)
            d0 = _checks.present(dins[0])   # one input, and not every input is underived (first branch)
            douts = [replace(d0, chain=d0.chain + (eqn,))]
        elif name in _SITES:
            derived = [i for i, d in enumerate(dins) if d is not None]
            pos = derived[0]
            kind = _site_kind(eqn, pos, invals, dins) if len(derived) == 1 else None
            outs = _bind(eqn, invals)
            if kind is None:
                for d in dins:
                    if d is not None:
                        ctx_bad(ctx, d.leaf)
            else:
                d = _checks.present(dins[pos])   # pos is a derived input
                act = invals[1 - pos] if kind != "gather" else invals[1]
                if isinstance(ctx, _Analysis):
                    ctx.sites.setdefault(d.leaf, []).append(_Site(
                        kind, eqn, pos, d.chain, tuple(outs[0].shape), outs[0].dtype, tuple(jnp.shape(act)),
                        path, d.mode, d.scan.params["length"] if d.scan is not None else 1))
                elif d.leaf in ctx.ghost and (k := _site_of(ctx.ghost[d.leaf], eqn)) is not None:
                    if isinstance(ctx.ghost[d.leaf], _Tied):
                        ctx.acts.setdefault(d.leaf, {})[k] = act
                        outs = [outs[0] + ctx.probes[d.leaf][k]]
                    else:
                        ctx.acts[d.leaf] = act
                        outs = [outs[0] + ctx.probes[d.leaf]]
        elif name == "scan":
            outs, douts = _run_scan(eqn, invals, dins, ctx, path)
        elif name in _REMAT:
            outs, douts = _run_remat(eqn, invals, dins, ctx, path)
        elif name in _CUSTOM:
            outs, douts = _run_custom(eqn, invals, dins, ctx, path)
        else:
            reason = _FLOW.get(name)
            for d in dins:
                if d is not None:
                    ctx_bad(ctx, d.leaf, reason or f"used by {name}", flow=reason is not None)
            outs = _bind(eqn, invals)
        for v, o, d in zip(eqn.outvars, outs, douts):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
                if d is not None:
                    denv[v] = d
    outs = [_read(env, v) for v in jaxpr.outvars]
    douts = [None if isinstance(v, jcore.Literal) else denv.get(v) for v in jaxpr.outvars]
    return outs, douts


def ctx_bad(ctx, leaf: int, reason: str = "unrecognised use", flow: bool = False) -> None:
    """Record that ``leaf`` has a use outside the ghost formulas (it falls back to the exact per-example
    gradient). ``flow``: the reason is unhandled control flow, which :func:`_plan` says once, by name."""
    if isinstance(ctx, _Analysis):
        ctx.bad.setdefault(leaf, reason)
        if flow:
            ctx.flow.setdefault(leaf, reason)


def _enclosed(ctx, eqn) -> dict:
    """The ghost sites (leaf -> site) inside control-flow equation ``eqn``."""
    return {i: s for i, s in ctx.ghost.items() if any(e is eqn for e in s.path)}


def _run_scan(eqn, invals, dins, ctx, path):
    """``lax.scan`` with parameter-derived inputs.

    A scanned-over input (``xs``) that is a leaf (up to dtype conversions) is a stack of per-iteration weights
    (the ``nnx.scan`` pattern): the body sees the slice ``W[l]``, and a ghost site on it is one site per layer
    (mode ``"stacked"``). A leaf passed as a constant of the body is shared by all iterations (an RNN's weight,
    mode ``"shared"``): its per-example gradient is the sum over iterations, whose ghost norm is the sequence
    formula over all ``L * T`` positions. Unhandled: a leaf in the carry, a leaf reshaped before it is scanned
    over, a scan inside a scan, and any use of a leaf-derived value the scan returns.

    With ghost sites inside, the scan is rebuilt (same length, direction and unroll) with the sites' probes as
    extra scanned-over inputs and their activations as extra stacked outputs: ``[L, ...]`` per example."""
    p = eqn.params
    nc, ncar, L = p["num_consts"], p["num_carry"], p["length"]
    body = p["jaxpr"]
    body_d = []
    for k, d in enumerate(dins):
        if d is None:
            body_d.append(None)
        elif d.scan is not None:
            ctx_bad(ctx, d.leaf, "used inside a scan nested in a scan", flow=True)
            body_d.append(None)
        elif k < nc:
            body_d.append(replace(d, scan=eqn, mode="shared"))
        elif k < nc + ncar:
            ctx_bad(ctx, d.leaf, "carried through a scan (in its carry)", flow=True)
            body_d.append(None)
        elif any(e.primitive.name != "convert_element_type" for e in d.chain):
            ctx_bad(ctx, d.leaf, "reshaped or transposed before it is scanned over", flow=True)
            body_d.append(None)
        else:
            body_d.append(replace(d, scan=eqn, mode="stacked"))
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    if isinstance(ctx, _Analysis):
        outs = _bind(eqn, invals)
        _, bd = _run(body.jaxpr, body.consts, list(consts) + list(init) + [x[0] for x in xs], body_d, ctx,
                     path + (eqn,))
        for k, d in enumerate(bd):
            if d is not None and k < ncar:
                ctx_bad(ctx, d.leaf, "carried through a scan (returned in its carry)", flow=True)
        return outs, [None if d is None else _Derived(d.leaf, poison="returned from a scan and used again")
                      for d in bd]
    rel = _enclosed(ctx, eqn)
    if not rel:
        return _bind(eqn, invals), [None] * len(eqn.outvars)
    probes = {i: ctx.probes[i] for i in rel}

    def step(carry, x):
        xs_i, pr_i = x
        inner = _Eval(rel, pr_i)
        o, _ = _run(body.jaxpr, body.consts, list(consts) + list(carry) + list(xs_i), body_d, inner, path + (eqn,))
        return o[:ncar], (o[ncar:], inner.acts)

    carry, (ys, acts) = lax.scan(step, list(init), (list(xs), probes), length=L, reverse=p["reverse"],
                                 unroll=p["unroll"])
    ctx.acts.update(acts)
    return list(carry) + list(ys), [None] * len(eqn.outvars)


def _run_remat(eqn, invals, dins, ctx, path):
    """``jax.checkpoint`` / ``nnx.remat`` with parameter-derived inputs: entered, and re-bound with the user's
    ``policy`` and ``prevent_cse``, so what it saves and recomputes is unchanged. The ghost sites' probes are
    extra inputs and their activations extra outputs (``O(T (d + p))`` per example and site, never ``|W|``)."""
    jx = eqn.params["jaxpr"]
    jx, consts = (jx.jaxpr, jx.consts) if isinstance(jx, jcore.ClosedJaxpr) else (jx, [])
    if isinstance(ctx, _Analysis):
        return _run(jx, consts, invals, dins, ctx, path + (eqn,))
    rel = _enclosed(ctx, eqn)
    probes = {i: ctx.probes[i] for i in rel}
    box: list = []

    def fn(pr, *args):
        inner = _Eval(rel, pr)
        o, do = _run(jx, consts, list(args), dins, inner, path + (eqn,))
        box[:] = [do]
        return o, inner.acts

    outs, acts = jax.checkpoint(fn, prevent_cse=eqn.params.get("prevent_cse", True),
                                policy=eqn.params.get("policy"))(probes, *invals)
    ctx.acts.update(acts)
    return list(outs), box[0]


def _run_custom(eqn, invals, dins, ctx, path):
    """``custom_vjp`` / ``custom_jvp`` with parameter-derived inputs. When its primal contains a recognised layer
    of a leaf (and returns no leaf-derived value), the PRIMAL is entered: that layer gets a ghost norm and the
    function is differentiated as its primal, not by its custom rule (said once, naming the function). Otherwise
    the call is kept as it is (its custom rule applies) and its leaves take the exact path."""
    cj = eqn.params["call_jaxpr"]
    jx, consts = (cj.jaxpr, cj.consts) if isinstance(cj, jcore.ClosedJaxpr) else (cj, [])
    if isinstance(ctx, _Analysis):
        sub = _Analysis()
        outs, douts = _run(jx, consts, invals, dins, sub, path + (eqn,))
        if sub.sites and all(d is None for d in douts):
            for i, s in sub.sites.items():
                ctx.sites.setdefault(i, []).extend(s)
            for i, r in sub.bad.items():
                ctx_bad(ctx, i, r, flow=i in sub.flow)
            _say_custom(eqn, cj)
            return outs, douts
        for d in dins:
            if d is not None:
                ctx_bad(ctx, d.leaf, f"used inside custom-derivative function {_fname(eqn, cj)!r}")
        return _bind(eqn, invals), [None] * len(eqn.outvars)
    if _enclosed(ctx, eqn):
        return _run(jx, consts, invals, dins, ctx, path + (eqn,))
    return _bind(eqn, invals), [None] * len(eqn.outvars)


def _fname(eqn, cj) -> str:
    info = getattr(cj.jaxpr if isinstance(cj, jcore.ClosedJaxpr) else cj, "debug_info", None)
    fname = getattr(info, "func_src_info", None) or eqn.params.get("name") or "a custom_vjp/custom_jvp function"
    return str(fname).split(" at ")[0]


_WARNED: set = set()


def _say_custom(eqn, cj) -> None:
    """Warn once per function that its custom derivative is replaced by the primal's derivative."""
    fname = _fname(eqn, cj)
    key = ("custom", fname)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"jaxdp: {fname!r} has a custom derivative rule ({eqn.primitive.name}) and takes a trainable parameter; "
        "method 'ghost'/'auto' differentiates its PRIMAL function (so that its layers get ghost norms), not the "
        "custom rule. If the rule is not the primal's derivative (e.g. a straight-through estimator), use "
        "method='vmap', which applies the rule.", stacklevel=2)


# ----------------------------------------------------------------------------------------------------------
# Per-site algebra (batched over examples: leading axis B on activations and output gradients)


def _apply_site(site: _Site, w, act):
    """The site's op, evaluated in the accumulation dtype (>= float32) at full precision, with parameter value
    ``w`` (before its chain, already in that dtype) and activation ``act`` (one example).

    The chain's dtype conversions are skipped and the matrix products are re-bound with ``HIGHEST`` precision
    and a float32 result: book-keeping and the exact fallback then compute the very vector whose norm the ghost
    formula bounds, never a bfloat16 / TF32 rounding of it (privacy rule: norms and sums in >= float32).
    """
    v = w
    for e in site.chain:
        if e.primitive.name != "convert_element_type":
            v = _bind(e, [v])[0]
    params = dict(site.eqn.params)
    if site.kind in ("dot", "conv"):
        act = act.astype(v.dtype)
        params["precision"] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
        params["preferred_element_type"] = v.dtype
    operands = [act, act]
    operands[site.pos] = v
    prim = site.eqn.primitive
    with site.eqn.ctx.manager:
        return prim.bind(*operands, **prim.get_bind_params(params))


def _apply_any(site: _Site, w, act):
    """:func:`_apply_site` for one example; a weight shared by a scan's iterations (mode ``"shared"``) is applied
    to each iteration's activation (``act [L, ...]``), so its vjp is the sum over iterations."""
    if site.mode == "shared":
        return jax.vmap(lambda a: _apply_site(site, w, a))(act)
    return _apply_site(site, w, act)


def _dot_mats(site: _Site, A, G):
    """Reshape batched activation / output gradient of a dot site into [B, T, d_in] and [B, T, d_out]."""
    (lc, rc), _ = site.eqn.params["dimension_numbers"]
    act_contract = lc if site.pos == 1 else rc
    a_nd = len(site.act_shape)
    a_free = [i for i in range(a_nd) if i not in act_contract]
    B = A.shape[0]
    A2 = jnp.transpose(A, [0] + [i + 1 for i in a_free] + [i + 1 for i in act_contract])
    T = math.prod(site.act_shape[i] for i in a_free)
    A2 = A2.reshape(B, T, -1)
    n_out = len(site.out_shape)
    n_af = len(a_free)
    if site.pos == 1:   # out = [a_free..., w_free...]
        G2 = G
    else:               # out = [w_free..., a_free...]
        n_wf = n_out - n_af
        G2 = jnp.transpose(G, [0] + list(range(n_wf + 1, n_out + 1)) + list(range(1, n_wf + 1)))
    return A2, G2.reshape(B, T, -1)


def _conv_mats(site: _Site, A, G):
    p = site.eqn.params
    w_shape = site.eqn.invars[1].aval.shape  # the kernel as the conv sees it (after the chain)
    dn = p["dimension_numbers"]
    rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
    filt = tuple(w_shape[i] for i in rhs_spec[2:])
    def patches(a):
        return lax.conv_general_dilated_patches(
            a, filt, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"], dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    P = jax.vmap(patches)(A)
    perm = [0] + [out_spec[0] + 1] + [s + 1 for s in out_spec[2:]] + [out_spec[1] + 1]
    B = A.shape[0]
    P = jnp.transpose(P, perm).reshape(B, -1, P.shape[out_spec[1] + 1])
    G2 = jnp.transpose(G, perm).reshape(B, P.shape[1], -1)
    return P, G2


def _gather_mats(site: _Site, n_rows: int, I, G):
    """Row ids ``[B, T]`` and output gradients ``[B, T, p]`` of a gather site, with the SAME out-of-range
    semantics as the gather's transpose (the scatter-add that forms the gradient): ``CLIP`` clamps the id, every
    other mode (``FILL_OR_DROP``, ``PROMISE_IN_BOUNDS`` -- raw ``E[ids]``) drops the row from the gradient
    (``PROMISE_IN_BOUNDS`` clamps in the forward pass but XLA's scatter skips out-of-range updates). Dropped
    positions get id ``-1`` and a zero gradient, so the norm is taken of exactly the vector added to the sum."""
    B = I.shape[0]
    idx = I.reshape(B, -1)
    G2 = G.reshape(B, idx.shape[1], -1)
    if site.eqn.params["mode"] == lax.GatherScatterMode.CLIP:
        return jnp.clip(idx, 0, n_rows - 1), G2
    valid = (idx >= 0) & (idx < n_rows)
    return jnp.where(valid, idx, -1), jnp.where(valid[..., None], G2, jnp.zeros((), G2.dtype))


def _mats(site: _Site, w_shape, A, G):
    """The site's per-example matrices: ``(A2 [B, T, d], G2 [B, T, p])`` for dot / conv sites, ``(ids [B, T],
    G2 [B, T, p])`` for gathers. A weight shared by the ``L`` iterations of a scan (mode ``"shared"``, ``A`` and
    ``G`` with an iteration axis after the batch axis) has the per-example gradient
    ``sum_l A_l^T G_l = [A_1; ..; A_L]^T [G_1; ..; G_L]``: the ``L`` iterations' positions become ONE sequence of
    ``L T`` positions, and the Gram formula over it includes every cross-iteration term."""
    if site.mode == "shared":
        B, L = A.shape[0], A.shape[1]
        m = _mats(_base(site), w_shape, A.reshape((B * L,) + A.shape[2:]), G.reshape((B * L,) + G.shape[2:]))
        return tuple(x.reshape((B, L * x.shape[1]) + x.shape[2:]) for x in m)
    if site.kind == "gather":
        return _gather_mats(site, w_shape[0], A, G)
    return _dot_mats(site, A, G) if site.kind == "dot" else _conv_mats(site, A, G)


def _site_dims(site: _Site, w_shape) -> tuple[int, int]:
    """(T, size of one example's materialised gradient) for the auto rule (:func:`_prefer_materialise`)."""
    size = math.prod(w_shape)
    if site.kind == "dot":
        (lc, rc), _ = site.eqn.params["dimension_numbers"]
        act_contract = lc if site.pos == 1 else rc
        T = math.prod(s for i, s in enumerate(site.act_shape) if i not in act_contract)
    elif site.kind == "conv":
        out_spec = site.eqn.params["dimension_numbers"].out_spec
        T = math.prod(site.out_shape[i] for i in [out_spec[0], *out_spec[2:]])
    else:
        T = math.prod(site.act_shape[:-1])
    return T, size


def _layer_shape(site: _Site, w_shape) -> tuple:
    """The shape one iteration's weight has (a stacked leaf ``[L, ...]`` is ``L`` layers)."""
    return tuple(w_shape[1:]) if site.mode == "stacked" else tuple(w_shape)


# Break-even of ghost extra multiply-adds / |W| per kind, measured on CPU (benchmarks/step_speed.py): a dense or
# embedding layer's per-example gradient comes out of the vmapped backward cheaply; a convolution's needs a
# per-example kernel-gradient convolution, which XLA:CPU runs slowly (MNIST CNN: conv2 at ratio 22 is faster
# as a ghost norm, conv1 at ratio 3,000 faster materialised; the transformer's layers at ratios 16-64 faster
# materialised). Convolutions are now always materialised by auto (kappa 0): their Gram norms over many output
# positions rarely meet the rounding-error bound's 2^-17 tolerance (measured E/s ~ 1e-4 on the MNIST CNN), and an
# uncertified ghost norm costs the ghost formula PLUS the exact materialisation (clip_bound_cost.py).
_KAPPA = {"dot": 2.0, "gather": 2.0, "conv": 0.0}
_KAPPA_BARE = {"dot": 2.0, "gather": 2.0, "conv": 64.0}   # the rule before the bound (benchmarks only)
_MATERIALISE_BYTES = 2 ** 28  # all materialised leaves together: B * sum |W| * 4 bytes at most (256 MiB)


def _prefer_materialise(site: _Site, w_shape, kappa: dict | None = None) -> bool:
    """The ``auto`` rule: materialise this layer's per-example gradients (inside the vmapped backward pass)
    rather than use the ghost norm, when that is cheaper (:func:`_plan` then checks the memory budget).

    Per example, the ghost norm of a sequence layer costs ``T^2 (d + p)`` extra multiply-adds (the Gram
    matrices; ``T^2 p`` for an embedding), on top of the book-keeping product, while materialising costs no
    extra multiply-adds (the per-example products ``A_i^T G_i`` replace the batch product ``A^T G``) but
    ``|W| = d p`` floats of memory and a few passes over them (norm, weighted sum). So: ghost when
    ``T = 1`` (``||a||^2 ||g||^2`` is nearly free), materialise when ``T^2 (d + p) > _KAPPA[kind] d p``
    (memory is budgeted over all leaves by :func:`_plan`). Measured on CPU (benchmarks/step_speed.py): the
    2-layer transformer (T 64, d 128) and the MNIST CNN's convolutions materialise, the MLP, the embedding text
    classifier (T 32, V 10,000) and every T = 1 layer use ghost norms.
    """
    T, size = _site_dims(site, _layer_shape(site, w_shape))
    d_out = max(1, math.prod(site.out_shape) // T)
    T = T * site.length if site.mode == "shared" else T   # a shared scan weight: L T positions
    if T <= 1:
        return False
    ghost_macs = T * T * (d_out if site.kind == "gather" else size // d_out + d_out)
    return ghost_macs > (_KAPPA if kappa is None else kappa)[site.kind] * size


# Floating-point error bound of the ghost formula. A Gram-form norm sum_{t,s} <a_t,a_s><g_t,g_s> can cancel
# (activations with a large common offset, gradients that sum to ~0 over positions): the float result may then be
# far below the true norm, or negative. We bound the rounding error of every step by the probabilistic rounding
# analysis of Higham & Mary (SIAM J. Sci. Comput. 2019): an inner product of length n computed in a float format
# with unit roundoff u has error <= lambda sqrt(n) u sum_k |x_k y_k| (probability >= 1 - 2n exp(-lambda^2/2) under
# independent rounding errors; lambda = 8 makes that < 1e-12 per inner product). The bound E on the squared norm
# and the bound E_bk on how far the book-keeping product (the vector actually added to the sum) can lie from the
# exact per-example gradient give an upper bound on the norm of that vector, N_hi = sqrt(s + E) + E_bk. When
# N_hi is within _TAU (relative) of the lower bound sqrt(s - E) the ghost value is used (inflated to N_hi);
# otherwise the example's gradient for that layer is materialised exactly (one example at a time) and BOTH its
# norm and its contribution to the sum come from that materialised vector.
_LAMBDA = 8.0
_TAU = 2.0 ** -17   # ~7.6e-6: a certified ghost norm lies in [exact, exact * (1 + _TAU)], within vmap's 1e-5
# The tolerance ``auto`` uses on a layer it would materialise but cannot within its memory budget
# (_MATERIALISE_BYTES, see _plan): there the exact fallback is the very cost auto avoids, and the rounding bound
# of a sequence layer is ~8 T u relative (T positions, u = 2^-24), so at 2^-17 EVERY example of a T >= 16 layer
# fell back. 2^-8 certifies random-data layers up to T ~ 2048 (measured: 1.5e-3 at T = 1024); an accepted norm is
# still an upper bound, so the only effect is that such an example is clipped to between C / (1 + 2^-8) and C (at
# most 0.4% over-clipping, the same factor as the bfloat16 rule), never above C.
_TAU_LARGE = 2.0 ** -8
_SAFE = 2.0 ** 60   # squared norms in [1/_SAFE, _SAFE] multiply without overflow or underflow in float32


def _gamma(n: int, u: float) -> float:
    return _LAMBDA * math.sqrt(max(n, 1)) * u


def _safe_scale(x, axes):
    """Per-example scale max|x| (1 where it is 0) so the Gram products neither overflow nor underflow."""
    return _scale_of(jnp.max(jnp.abs(x), axis=axes))


def _scale_of(s):
    """A largest |entry| ``s`` as a scale: itself, 1 where it is 0, and non-finite values kept (they flag)."""
    return jnp.where((s > 0) & jnp.isfinite(s), s, jnp.where(jnp.isfinite(s), 1.0, s).astype(s.dtype))


def _two_stage_sum(P, u: float):
    """``sum_{t,s} P[b,t,s]`` as T row sums then one sum of T (each a separate reduction), with its rounding
    bound ``gamma(T) (sum |P| + sum_t |row_t|)`` -- ``2 gamma(T)`` rather than one reduction's ``gamma(T^2)``."""
    T = P.shape[1]
    rows = jnp.sum(P, axis=2)
    rows = lax.optimization_barrier(rows)   # keep the two reductions apart (their bound assumes it)
    total = jnp.sum(rows, axis=1)
    return total, _gamma(T, u) * (jnp.sum(jnp.abs(P), axis=(1, 2)) + jnp.sum(jnp.abs(rows), axis=1))


def _scaled_outer_sq(A2, G2):
    """``||a||^2 ||g||^2`` of ``T = 1`` sites computed on max-abs-scaled vectors (no overflow / underflow)."""
    sa, sg = _safe_scale(A2, (1, 2)), _safe_scale(G2, (1, 2))
    na2 = jnp.sum(jnp.square(A2[:, 0] / sa[:, None]), -1)
    ng2 = jnp.sum(jnp.square(G2[:, 0] / sg[:, None]), -1)
    return na2 * ng2 * (sa * sg) ** 2


def _certified(s, E, E_bk, tau: float = _TAU):
    """(upper bound on the norm, whether the bound is tight enough to use) from the float value ``s`` of a
    squared norm, its error bound ``E`` and the book-keeping bound ``E_bk`` (all in the same scaled units): the
    upper bound is used when it is within ``tau`` (relative) of the lower bound."""
    hi = jnp.sqrt(jnp.maximum(s, 0) + E) + E_bk
    lo = jnp.sqrt(jnp.maximum(s - E, 0))
    return hi, jnp.isfinite(s) & (hi <= (1 + tau) * lo)


def _ghost_sq(site: _Site, w_shape, A, G, acc, certify: bool = True, tau: float = _TAU):
    """Per-example squared norms ``[B]`` of this site's weight gradient (an upper bound, see above) and a ``[B]``
    mask of the examples whose ghost value is not certified and must be computed exactly (``None`` where no
    example can need it: ``T = 1`` sites). ``acc`` is the accumulation dtype (>= float32); ``tau`` the
    certification tolerance (:func:`_certified`). ``certify=False`` is the bare Gram formula without bound or
    fallback (NOT private: kept only so that ``benchmarks/clip_bound_cost.py`` can measure what the bound costs)."""
    hi_p = lax.Precision.HIGHEST
    u = float(jnp.finfo(acc).eps) / 2
    if not certify:
        return _bare_gram(site, w_shape, A.astype(acc) if site.kind != "gather" else A, G.astype(acc)), None
    if site.kind == "gather":
        idx, G2 = _mats(site, w_shape, A, G.astype(acc))
        sg = _safe_scale(G2, (1, 2))
        Gh = G2 / sg[:, None, None]
        T, p = Gh.shape[1], Gh.shape[2]
        if T == 1:
            return jnp.sum(jnp.square(Gh[:, 0]), -1) * sg ** 2, None
        same = ((idx[:, :, None] == idx[:, None, :]) & (idx[:, :, None] >= 0)).astype(acc)
        gg = jnp.einsum("bti,bsi->bts", Gh, Gh, precision=hi_p)
        s, E_sum = _two_stage_sum(same * gg, u)
        ng = jnp.sqrt(jnp.maximum(jnp.diagonal(gg, axis1=1, axis2=2), 0))
        rows = jnp.einsum("bt,bts,bs->b", ng, same, ng, precision=hi_p)
        E = _gamma(p, u) * rows + E_sum
        hi, ok = _certified(s, E, _gamma(T, u) * jnp.sqrt(rows), tau)
        return (hi * sg) ** 2, ~ok & jnp.isfinite(s)
    A2, G2 = _mats(site, w_shape, A if site.kind == "dot" else A.astype(acc), G)
    A2, G2 = A2.astype(acc), G2.astype(acc)
    if A2.shape[1] == 1:   # ||a||^2 ||g||^2: sums of squares, no cancellation, one outer product per example
        na2, ng2 = jnp.sum(jnp.square(A2[:, 0]), -1), jnp.sum(jnp.square(G2[:, 0]), -1)
        extreme = ~((na2 > 1 / _SAFE) & (na2 < _SAFE) & (ng2 > 1 / _SAFE) & (ng2 < _SAFE))
        # Rescale (an extra pass over A and G) only when some example's squared norms could overflow,
        # underflow or lose precision in their product.
        sq = lax.cond(jnp.any(extreme), lambda: jnp.where(extreme, _scaled_outer_sq(A2, G2), na2 * ng2),
                      lambda: na2 * ng2)
        return sq, None
    sa, sg = _safe_scale(A2, (1, 2)), _safe_scale(G2, (1, 2))
    Ah, Gh = A2 / sa[:, None, None], G2 / sg[:, None, None]
    T, d, p = Ah.shape[1], Ah.shape[2], Gh.shape[2]
    aa = jnp.einsum("bti,bsi->bts", Ah, Ah, precision=hi_p)
    gg = jnp.einsum("bto,bso->bts", Gh, Gh, precision=hi_p)
    s, E_sum = _two_stage_sum(aa * gg, u)
    na = jnp.sqrt(jnp.maximum(jnp.diagonal(aa, axis1=1, axis2=2), 0))
    ng = jnp.sqrt(jnp.maximum(jnp.diagonal(gg, axis1=1, axis2=2), 0))
    abs_aa, abs_gg = jnp.abs(aa), jnp.abs(gg)
    E = (_gamma(d, u) * jnp.einsum("bt,bts,bs->b", na, abs_gg, na, precision=hi_p)
         + _gamma(p, u) * jnp.einsum("bt,bts,bs->b", ng, abs_aa, ng, precision=hi_p)
         + E_sum)
    hi, ok = _certified(s, E, _gamma(T, u) * jnp.sum(na * ng, -1), tau)
    return (hi * sa * sg) ** 2, ~ok & jnp.isfinite(s)


def _bare_gram(site: _Site, w_shape, A, G):
    """The Gram formula as it was before the rounding-error bound (benchmarks only; can under-estimate)."""
    if site.kind == "gather":
        idx, G2 = _mats(site, w_shape, A, G)
        same = ((idx[:, :, None] == idx[:, None, :]) & (idx[:, :, None] >= 0)).astype(G2.dtype)
        return jnp.sum(same * jnp.einsum("bti,bsi->bts", G2, G2, precision=lax.Precision.HIGHEST), axis=(1, 2))
    A2, G2 = _mats(site, w_shape, A, G)
    if A2.shape[1] == 1:
        return jnp.sum(jnp.square(A2[:, 0]), -1) * jnp.sum(jnp.square(G2[:, 0]), -1)
    aa = jnp.einsum("bti,bsi->bts", A2, A2, precision=lax.Precision.HIGHEST)
    gg = jnp.einsum("bto,bso->bts", G2, G2, precision=lax.Precision.HIGHEST)
    return jnp.sum(aa * gg, axis=(1, 2))


def _bookkeep(site: _Site, w, A, G, weights):
    """``sum_i weights_i * (per-example gradient of w at this site)`` in one batched transpose, in the
    accumulation dtype of ``weights`` (>= float32)."""
    acc = weights.dtype

    def batched(ww):
        return jax.vmap(lambda a: _apply_any(site, ww, a))(A)
    _, vjp = jax.vjp(batched, w.astype(acc))
    wg = weights.reshape((-1,) + (1,) * (G.ndim - 1)) * G.astype(acc)
    return vjp(wg)[0]


def _chunk_size(B: int, w_size: int) -> int:
    """Largest divisor of ``B`` such that that many materialised gradients fit in ~64 MiB."""
    cap = max(1, min(B, (2 ** 26) // max(1, 4 * w_size)))
    return max(k for k in range(1, cap + 1) if B % k == 0)


def _exact_where(sites: tuple, w, As: tuple, Gs: tuple, sel, sq_g):
    """The squared norms ``sq_g``, with those of the examples ``sel`` replaced by the norms of their materialised
    gradients (:func:`_exact_sites`, run only when some example needs it)."""
    sq_x = lax.cond(jnp.any(sel), lambda: _exact_sites(sites, w, As, Gs, sel, None)[0],
                    lambda: jnp.zeros(sel.shape, sq_g.dtype))
    return jnp.where(sel, sq_x, sq_g)


def _exact_sites(sites: tuple, w, As: tuple, Gs: tuple, sel, weights):
    """The exact fallback for the examples ``sel`` (bool ``[B]``): their per-example gradients of leaf ``w`` at
    ``sites`` (one, or a tied leaf's several: their sum), materialised a chunk of examples at a time (bounded
    squared norms of the materialised vectors (0 where not selected) and, when ``weights`` is given,
    ``sum_i sel_i weights_i g_i`` of the same vectors. Runs under ``lax.cond`` only when some example needs it."""
    acc = pe.acc_dtype(w.dtype)
    w32 = w.astype(acc)
    B = As[0].shape[0]
    k = _chunk_size(B, math.prod(w.shape))
    As = tuple(_zero_dropped(A, sel) for A in As)
    Gs = tuple(_zero_dropped(G, sel) for G in Gs)

    def one(a, g):   # the example's gradient: the sum of its sites' gradients (several for a tied leaf)
        _, vjp = jax.vjp(lambda ww: [_apply_any(s, ww, ak) for s, ak in zip(sites, a)], w32)
        return vjp([gk.astype(acc) for gk in g])[0]

    def chunk(carry, xs):
        a, g, m, wt = xs
        v = jax.vmap(one)(a, g)
        sq = jnp.where(m, jnp.sum(jnp.square(v.reshape(k, -1)), -1), 0)
        return carry + jnp.tensordot(jnp.where(m, wt, 0), v, axes=1), sq

    wts = jnp.zeros((B,), acc) if weights is None else weights.astype(acc)
    xs = jax.tree_util.tree_map(lambda x: x.reshape((B // k, k) + x.shape[1:]), (As, Gs, sel, wts))
    total, sq = lax.scan(chunk, jnp.zeros(w.shape, acc), xs)
    return sq.reshape(B), total


def _site_sq(site: _Site, w, A, G, certify: bool = True, tau: float = _TAU):
    """Per-example squared norms ``[B]`` of leaf ``w``'s gradient at its one ghost site, and the mask of examples
    whose value came from the exact fallback (``None`` where none can: ``T = 1`` sites, ``certify=False``).

    Every value is an upper bound on the norm of the vector :func:`_site_sum` adds (the ghost value inflated
    by its rounding bound, or the norm of the materialised vector itself). A stacked scan leaf (mode
    ``"stacked"``, ``A``/``G`` ``[B, L, ...]``) is ``L`` layers: each ``W[l]`` is bounded and certified on its
    own, per (example, layer), in a loop over layers (one layer's Gram matrices live at a time), and the
    squared norms add up; its mask is ``[L, B]``."""
    acc = pe.acc_dtype(w.dtype)
    if site.mode == "stacked":
        base = _base(site)

        def layer(args):
            wl, a, g = args
            sq_l, sel_l = _site_sq(base, wl, a, g, certify, tau)
            return sq_l, (jnp.zeros(sq_l.shape, bool) if sel_l is None else sel_l)
        sq, sel = lax.map(layer, (w, jnp.moveaxis(A, 1, 0), jnp.moveaxis(G, 1, 0)))
        return jnp.sum(sq, 0), sel
    sq_g, sel = _ghost_sq(site, w.shape, A, G, acc, certify, tau)
    if sel is None:   # T = 1 sites (no cancellation possible) and certify=False (benchmarks only)
        return sq_g, None
    return _exact_where((site,), w, (A,), (G,), sel, sq_g), sel


def _site_sum(site: _Site, w, A, G, sel, weights):
    """``sum_i weights_i g_i`` for leaf ``w``'s one ghost site, in the accumulation dtype: book-keeping (one
    batched product) for the examples whose ghost norm was used, plus the exact materialised vectors of those in
    ``sel`` (the same vectors whose norms :func:`_site_sq` returned). A stacked scan leaf: one product per
    layer, stacked to the leaf's shape ``[L, ...]``."""
    if site.mode == "stacked":
        base = _base(site)

        def layer(args):   # one layer's (w, A, G, sel)
            lw, la, lg, lsel = args
            return _site_sum(base, lw, la, lg, lsel, weights)

        return lax.map(layer, (w, jnp.moveaxis(A, 1, 0), jnp.moveaxis(G, 1, 0), sel))
    if sel is None:   # no example needs the exact fallback at this site
        keep = weights != 0
        return _bookkeep(site, w, _zero_dropped(A, keep), _zero_dropped(G, keep), weights)
    return _sum_sites((site,), w, (A,), (G,), sel, weights)


def _sum_sites(sites: tuple, w, As: tuple, Gs: tuple, sel, weights):
    """``sum_i weights_i g_i`` of leaf ``w`` at ``sites`` (one, or a tied leaf's several): each site's book-keeping
    product for the examples whose ghost norm was used, plus the exact materialised vectors (all sites) of those
    in ``sel``."""
    w_bk = jnp.where(sel, 0, weights)
    keep = w_bk != 0   # 0 * NaN would poison the sum: zero dropped examples' inputs first
    total = sum(_bookkeep(site, w, _zero_dropped(A, keep), _zero_dropped(G, keep), w_bk)
                for site, A, G in zip(sites, As, Gs))
    sel_w = sel & (weights != 0)
    return total + lax.cond(jnp.any(sel_w), lambda: _exact_sites(sites, w, As, Gs, sel_w, weights)[1],
                            lambda: jnp.zeros_like(total))


# ----------------------------------------------------------------------------------------------------------
# Tied leaves: one 2-D weight at several sites (see _Tied)

# A tied leaf's one-hot rows enter the scaled Gram matrices with weight 1 / s_u (s_u: the largest entry of its dot
# sites' axis-0 factors); outside [2^-30, 2^30] that weight could under- or overflow, so such an example is computed
# exactly instead (never a norm that lost a term).
_TIED_RANGE = 2.0 ** 30


def _tied_list(acts) -> tuple:
    """A tied leaf's activations, recorded as ``{site index: activation}``, in site order."""
    return tuple(acts[k] for k in sorted(acts))


def _tied_parts(tied: _Tied, w_shape, As, Gs, acc):
    """Per site, its factors on the leaf's two axes: ``("ids", ids [B, T], V [B, T, D])`` for a gather,
    ``("dense", U [B, T, V], V [B, T, D])`` for a dot (the per-example gradient is ``sum_t u_t v_t^T``)."""
    parts = []
    for site, flip, A, G in zip(tied.sites, tied.u_is_act, As, Gs):
        if site.kind == "gather":
            ids, V = _gather_mats(site, w_shape[0], A, G.astype(acc))
            parts.append(("ids", ids, V))
            continue
        A2, G2 = _dot_mats(site, A, G)
        A2, G2 = A2.astype(acc), G2.astype(acc)
        parts.append(("dense",) + ((A2, G2) if flip else (G2, A2)))
    return parts


def _max_scale(xs: list, B: int, acc):
    """Per-example largest |entry| over the arrays ``xs`` as a scale (:func:`_scale_of`; 1 when there are none)."""
    if not xs:
        return jnp.ones((B,), acc)
    return _scale_of(jnp.max(jnp.stack([jnp.max(jnp.abs(x), axis=(1, 2)) for x in xs]), axis=0))


def _tied_sq(tied: _Tied, w, As, Gs, tau: float = _TAU):
    """Per-example squared norms ``[B]`` (upper bounds, as :func:`_ghost_sq`) of a tied leaf's gradient -- the SUM
    of its sites' gradients -- and the mask of the examples computed exactly.

    All the sites' positions form one sequence: ``||sum_t u_t v_t^T||^2 = sum_{t,s} <u_t, u_s> <v_t, v_s>``, with
    ``<u_t, u_s>`` = ``[id_t = id_s]`` between two gather positions, ``U_s[id_t]`` between a gather and a dot
    position, and the dot product over ``V`` between two dot positions. The rounding bound and the certification
    are the sequence formula's (:func:`_ghost_sq`); an uncertified example is materialised exactly (all its
    sites), and so is one whose one-hot weight ``1 / s_u`` leaves ``[2^-30, 2^30]``."""
    acc = pe.acc_dtype(w.dtype)
    hi_p = lax.Precision.HIGHEST
    u = float(jnp.finfo(acc).eps) / 2
    B = As[0].shape[0]
    Vn, Dn = w.shape
    parts = _tied_parts(tied, w.shape, As, Gs, acc)
    su = _max_scale([U for kind, U, _ in parts if kind == "dense"], B, acc)
    sv = _max_scale([Vm for _, _, Vm in parts], B, acc)
    in_range = (su >= 1 / _TIED_RANGE) & (su <= _TIED_RANGE)
    c = jnp.where(in_range, 1 / su, 1.0)                         # the one-hot rows' scaled value
    blocks_u = []
    for kind_t, Ut, _ in parts:
        row = []
        for kind_s, Us, _ in parts:
            if kind_t == "ids" and kind_s == "ids":
                same = (Ut[:, :, None] == Us[:, None, :]) & (Ut[:, :, None] >= 0)
                row.append(same.astype(acc) * (c * c)[:, None, None])
            elif kind_t == "ids":    # <e_{id_t} c, U_s / su> = c * U_s[id_t] / su
                pick = jax.vmap(lambda U, ids: jnp.where(ids[:, None] >= 0, U[:, jnp.maximum(ids, 0)].T, 0))(
                    Us / su[:, None, None], Ut)
                row.append(pick * c[:, None, None])
            elif kind_s == "ids":
                pick = jax.vmap(lambda U, ids: jnp.where(ids[None, :] >= 0, U[:, jnp.maximum(ids, 0)], 0))(
                    Ut / su[:, None, None], Us)
                row.append(pick * c[:, None, None])
            else:
                row.append(jnp.einsum("bti,bsi->bts", Ut / su[:, None, None], Us / su[:, None, None],
                                      precision=hi_p))
        blocks_u.append(jnp.concatenate(row, axis=2))
    uu = jnp.concatenate(blocks_u, axis=1)
    Vh = jnp.concatenate([Vm for _, _, Vm in parts], axis=1) / sv[:, None, None]
    vv = jnp.einsum("bti,bsi->bts", Vh, Vh, precision=hi_p)
    T = uu.shape[1]
    s, E_sum = _two_stage_sum(uu * vv, u)
    nu = jnp.sqrt(jnp.maximum(jnp.diagonal(uu, axis1=1, axis2=2), 0))
    nv = jnp.sqrt(jnp.maximum(jnp.diagonal(vv, axis1=1, axis2=2), 0))
    E = (_gamma(Vn, u) * jnp.einsum("bt,bts,bs->b", nu, jnp.abs(vv), nu, precision=hi_p)
         + _gamma(Dn, u) * jnp.einsum("bt,bts,bs->b", nv, jnp.abs(uu), nv, precision=hi_p)
         + E_sum)
    # book-keeping: each site's batched product (T_k terms) and the sum of the K sites' results
    hi, ok = _certified(s, E, _gamma(T + len(parts), u) * jnp.sum(nu * nv, -1), tau)
    sel = (~ok | ~in_range) & jnp.isfinite(su) & jnp.isfinite(sv)
    sq_g = (hi * su * sv) ** 2
    return _exact_where(tied.sites, w, As, Gs, sel, sq_g), sel


def _prefer_materialise_tied(tied: _Tied, w_shape) -> bool:
    """The ``auto`` rule for a tied leaf (as :func:`_prefer_materialise`): the combined Gram matrices over all
    ``T`` positions cost ``T^2 (V + D)`` per example against ``|W| = V D`` floats of per-example gradient."""
    T = sum(_site_dims(s, w_shape)[0] for s in tied.sites)
    size = math.prod(w_shape)
    return T * T * (w_shape[0] + w_shape[1]) > _KAPPA["dot"] * size


# ----------------------------------------------------------------------------------------------------------
# The backends registered with jaxdp.per_example


def _zero_dropped(x, keep):
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _plan(loss_fn, has_aux, leaves, treedef, b_leaves, b_def, policy, kappa=None):
    """Trace the per-example loss and decide, per trainable leaf, how its per-example norm is computed.

    Under ``auto``, the leaves the cost rule would materialise are materialised smallest first while all of
    them together (``B |W|`` floats each) fit in ``_MATERIALISE_BYTES``; the others keep the ghost norm and are
    returned as ``relaxed`` (certified at ``_TAU_LARGE``: their exact fallback is the cost auto avoids).

    Returns (closed jaxpr, aux treedef holder, ghost {leaf: site}, materialise {leaf}, relaxed {leaf}).
    """
    n = len(leaves)
    aux_def: list = []

    def single_flat(*flat):
        p = jax.tree_util.tree_unflatten(treedef, list(flat[:n]))
        ex1 = jax.tree_util.tree_unflatten(b_def, list(flat[n:]))
        out = loss_fn(p, ex1)
        losses, aux = out if has_aux else (out, None)
        pe.check_losses(losses, 1)
        a_leaves, a_def = jax.tree_util.tree_flatten(jax.tree_util.tree_map(lambda a: a[0], aux))
        aux_def[:] = [a_def]
        return [losses[0]] + a_leaves

    ex_avals = [jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype) for x in b_leaves]
    closed = jax.make_jaxpr(single_flat)(*leaves, *ex_avals)
    analysis = _Analysis()
    jax.eval_shape(
        lambda *flat: _run(closed.jaxpr, closed.consts, list(flat),
                           [_Derived(i) for i in range(n)] + [None] * len(b_leaves), analysis)[0],
        *leaves, *ex_avals)

    if analysis.flow:
        _say_flow(analysis.flow, pe.leaf_names(jax.tree_util.tree_unflatten(treedef, leaves)))
    ghost: dict[int, _Site] = {}
    wanted: list[tuple[int, int]] = []   # (bytes of B per-example gradients, leaf) the cost rule materialises
    B = b_leaves[0].shape[0]
    for i in range(n):
        s = analysis.sites.get(i, [])
        if i in analysis.bad or not s or not jnp.issubdtype(leaves[i].dtype, jnp.floating):
            continue
        if len(s) > 1:   # tied / shared weight: one combined formula over all its sites, if it applies
            tied = _tie(s, tuple(leaves[i].shape))
            if tied is None:
                continue
            ghost[i] = tied
            if policy == "auto" and _prefer_materialise_tied(tied, leaves[i].shape):
                wanted.append((B * math.prod(leaves[i].shape) * 4, i))
            continue
        ghost[i] = s[0]
        if policy == "auto" and _prefer_materialise(s[0], leaves[i].shape, kappa):
            wanted.append((B * math.prod(leaves[i].shape) * 4, i))
    materialise: set[int] = set()
    relaxed: set[int] = set()
    used = 0
    for nbytes, i in sorted(wanted):
        if used + nbytes <= _MATERIALISE_BYTES:
            materialise.add(i)
            used += nbytes
        else:
            relaxed.add(i)
    return closed, aux_def, ghost, materialise, relaxed


def _say_flow(flow: dict, names: list) -> None:
    """One warning per (parameter, reason): these leaves are inside control flow the ghost engine does not
    handle, so their per-example gradients are materialised (exact, ``B x |leaf|`` floats)."""
    for i, reason in sorted(flow.items()):
        key = ("flow", names[i], reason)
        if key in _WARNED:
            continue
        _WARNED.add(key)
        warnings.warn(
            f"jaxdp: parameter {names[i]!r} is {reason}, which the ghost engine does not handle; its per-example "
            "gradients are materialised (exact, B x its size in memory). Ghost norms are used through lax.scan "
            "(weights stacked per iteration or shared by all iterations), jax.checkpoint / nnx.remat, nested jit "
            "and custom_vjp / custom_jvp.", stacklevel=3)


def explain(loss_fn: Callable, params: Any, batch: Any, method: str = "auto", has_aux: bool = False
            ) -> dict[str, str]:
    """How each leaf's per-example norm is computed: ``"ghost"``, ``"materialise"`` (that layer only) or
    ``"vmap"`` (fallback: unrecognised, shared or bias-like use). ``batch`` needs its leading batch axis."""
    if method not in ("ghost", "auto"):
        raise ValueError(f"explain() describes method 'ghost' or 'auto', got {method!r}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    b_leaves, b_def = jax.tree_util.tree_flatten(batch)
    _, _, ghost, mat, _ = _plan(loss_fn, has_aux, leaves, treedef, b_leaves, b_def, method)
    if method == "auto" and (not ghost or len(mat) == len(ghost)):
        ghost, mat = {}, set()
    kinds = ["materialise" if i in mat else "ghost" if i in ghost else "vmap" for i in range(len(leaves))]
    return dict(zip(pe.leaf_names(params), kinds))


def _tolerance(rtol: float | None, relaxed: bool) -> float:
    """The certification tolerance of one ghost leaf: ``rtol`` when given; otherwise ``_TAU`` (2^-17), except
    for a leaf ``auto`` would materialise but cannot within its memory budget (``relaxed``), where the exact
    fallback is what auto avoids: ``_TAU_LARGE`` (2^-8)."""
    if rtol is not None:
        return rtol
    return _TAU_LARGE if relaxed else _TAU


def _make_impl(policy: str, second_pass: bool = False, certify: bool = True,
               rtol: float | None = None) -> Callable:
    def impl(loss_fn, has_aux, params, batch, weight_fn):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        b_leaves, b_def = jax.tree_util.tree_flatten(batch)
        n = len(leaves)
        closed, aux_def, ghost, materialise, relaxed = _plan(loss_fn, has_aux, leaves, treedef, b_leaves, b_def, policy,
                                                    None if certify else _KAPPA_BARE)
        if not ghost or (policy == "auto" and len(materialise) == len(ghost)):
            return pe.vmap_backend(loss_fn, has_aux, params, batch, weight_fn)
        # Layers to materialise are differentiated per example inside the same vmapped backward pass, like
        # the fallback leaves (measured faster than recomputing A_i^T G_i from recorded activations).
        ghost = {i: s for i, s in ghost.items() if i not in materialise}

        fb = [i for i in range(n) if i not in ghost]

        def per_example(fb_leaves, probes, ex):
            ex1 = [x[None] for x in ex]
            all_leaves = list(leaves)
            for i, v in zip(fb, fb_leaves):
                all_leaves[i] = v
            ctx = _Eval(ghost, probes)
            outs, _ = _run(closed.jaxpr, closed.consts, all_leaves + ex1,
                           [_Derived(i) for i in range(n)] + [None] * len(ex1), ctx)
            return outs[0], (outs[0], outs[1:], ctx.acts)

        def one(ex, probes):
            _, vjp, (loss, aux, acts) = jax.vjp(
                lambda f, p: per_example(f, p, ex), [leaves[i] for i in fb], probes, has_aux=True)
            g_fb, g_probes = vjp(jnp.ones_like(loss))
            return g_fb, g_probes, loss, aux, acts

        B = b_leaves[0].shape[0]
        taus = {i: _tolerance(rtol, i in relaxed) for i in ghost}
        probes = {i: tuple(jnp.zeros((B,) + _probe_shape(t), t.out_dtype) for t in s.sites)
                  if isinstance(s, _Tied) else jnp.zeros((B,) + _probe_shape(s), s.out_dtype)
                  for i, s in ghost.items()}
        g_fb, g_probes, losses, aux_leaves, acts = jax.vmap(one)(b_leaves, probes)
        # Norms and sums below must read the same values (see jaxdp.per_example.pin_low_precision).
        g_fb, g_probes, acts = pe.pin_low_precision((g_fb, g_probes, acts))

        sq: list = [None] * n
        per_ex: dict[int, jax.Array] = {}
        exact_sel: dict[int, jax.Array] = {}
        for i, g in zip(fb, g_fb):
            per_ex[i] = g
            sq[i] = pe.sq_norms(g)
        for i, site in ghost.items():
            if isinstance(site, _Tied):
                sq[i], exact_sel[i] = _tied_sq(site, leaves[i], _tied_list(acts[i]), g_probes[i], taus[i])
            else:
                sq[i], exact_sel[i] = _site_sq(site, leaves[i], acts[i], g_probes[i], certify, taus[i])

        clip = weight_fn(sq)
        weights = clip.leaf_weights
        if second_pass:  # measured alternative (benchmarks only): grad of sum_i w_i L_i, flat weights only
            w = jax.lax.stop_gradient(weights[0])

            def weighted(p):
                out = loss_fn(p, batch)
                return jnp.sum(w * (out[0] if has_aux else out))
            aux = jax.tree_util.tree_unflatten(aux_def[0], aux_leaves) if has_aux else None
            return pe.BackendOutput(jax.grad(weighted)(params), sq, losses, aux, clip)
        summed: list = [None] * n
        for i in range(n):
            if i in per_ex:
                summed[i] = pe.weighted_sum(weights[i], per_ex[i])
                continue
            w = weights[i].astype(pe.acc_dtype(leaves[i].dtype))
            if isinstance(ghost[i], _Tied):
                total = _sum_sites(ghost[i].sites, leaves[i], _tied_list(acts[i]), g_probes[i], exact_sel[i], w)
            else:
                total = _site_sum(ghost[i], leaves[i], acts[i], g_probes[i], exact_sel[i], w)
            summed[i] = pe.to_output(total, leaves[i].dtype)
        aux = jax.tree_util.tree_unflatten(aux_def[0], aux_leaves) if has_aux else None
        return pe.BackendOutput(jax.tree_util.tree_unflatten(treedef, summed), sq, losses, aux, clip)

    impl.__name__ = f"{policy}_impl"
    return impl


ghost_impl = _make_impl("ghost")
auto_impl = _make_impl("auto")


def backend(policy: str = "auto", rtol: float | None = None) -> Callable:
    """A ghost-norm per-example backend with its own certification tolerance, to register under a name of your
    choice (:func:`jaxdp.per_example.register_backend`) and pass as ``method=``.

    A ghost norm (``sum_{t,s} <a_t, a_s><g_t, g_s>`` for a layer applied at ``T`` positions) is computed in
    float32 with a bound ``E`` on its rounding error, and the upper bound ``N_hi`` (the norm of the vector added
    to the sum can never exceed it) is used for clipping when ``N_hi <= (1 + rtol) N_lo``; otherwise that
    example's gradient for that layer is materialised exactly. The bound grows like ``8 T u`` (``u = 2^-24``), so
    at the built-in 2^-17 a sequence layer with ``T >= 16`` positions falls back for EVERY example (the Gram
    matrices AND the materialised gradient are computed). A larger ``rtol`` lets those norms be used.

    Privacy: unchanged for any ``rtol`` -- the value used is always an upper bound, so every example's
    contribution stays ``<= C``. Utility: a certified example is clipped to a norm between ``C / (1 + rtol)``
    and ``C`` where the exact computation gives exactly ``C`` (over-clipping by at most ``rtol``); and ghost and
    vmap then agree to ``rtol`` rather than 1e-5.

    Args:
      policy: ``"auto"`` (materialise the layers where that is cheaper, as the built-in ``auto``) or ``"ghost"``
        (ghost norms wherever the layer is recognised).
      rtol: the certification tolerance, in ``[2^-20, 2^-4]``; ``None`` keeps the built-in rule (2^-17, and
        2^-8 under ``auto`` on the layers it would materialise but cannot within its 256 MiB budget).

    >>> import jax.numpy as jnp
    >>> from jaxdp import ghost, per_example
    >>> per_example.register_backend("auto_1e-3", ghost.backend("auto", rtol=2.0 ** -10))
    >>> "auto_1e-3" in per_example.backend_names()
    True
    >>> per_example.unregister_backend("auto_1e-3")

    Raises:
      ValueError: ``policy`` is not ``"auto"`` or ``"ghost"``, or ``rtol`` is outside ``[2^-20, 2^-4]``.
    """
    if policy not in ("auto", "ghost"):
        raise ValueError(f"policy must be 'auto' or 'ghost', got {policy!r}")
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 2.0 ** -20 <= rtol <= 2.0 ** -4:
            raise ValueError(f"rtol must be a number in [2^-20, 2^-4] (the relative over-clipping a certified "
                             f"ghost norm may carry), or None for the built-in rule; got {rtol!r}")
        rtol = float(rtol)
    return _make_impl(policy, rtol=rtol)
_second_pass_impl = _make_impl("ghost", second_pass=True)  # NOT registered: no per-layer weights, NaN-unsafe
_auto_unbounded_impl = _make_impl("auto", certify=False)   # NOT registered: the pre-bound formula, benchmarks only
pe.register_backend("ghost", ghost_impl)
pe.register_backend("auto", auto_impl)

__all__ = ["ghost_impl", "auto_impl", "backend", "explain"]
