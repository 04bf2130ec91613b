"""jaxdp.per_example: the backend contract, the registry, pure clip weights; no clipping <-> ghost import cycle and
no silent fall-back of "auto" to "vmap"; keyword-only noise arguments; adaptive clipping on the public noise."""
import ast
import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import per_example

ROOT = Path(__file__).resolve().parents[1]
C = 0.5


def _loss(p, b):
    return jnp.sum((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2, axis=1)


def _params():
    return {"w": jnp.full((3, 2), 0.7), "b": jnp.array([0.3, -0.2])}


def _batch(B=6):
    x = jax.random.normal(jax.random.key(0), (B, 3)) * jnp.arange(1, B + 1)[:, None]   # norms from ~1 to ~50
    return {"x": x, "y": jnp.ones((B, 2))}


class _Spy:
    """A registered backend: the vmap backend, counting how often it is traced."""

    def __init__(self):
        self.calls = 0

    def __call__(self, loss_fn, has_aux, params, batch, weight_fn):
        self.calls += 1
        return per_example.vmap_backend(loss_fn, has_aux, params, batch, weight_fn)


@pytest.fixture
def spy():
    backend = _Spy()
    per_example.register_backend("test_spy", backend)
    yield backend
    per_example.unregister_backend("test_spy")


# ----------------------------------------------------------------------------------------------------------
# Imports: no cycle, no silent fall-back


def _module_imports(name: str) -> set[str]:
    tree = ast.parse((ROOT / "jaxdp" / f"{name}.py").read_text())
    found = set()
    for node in tree.body:   # module-level imports only (those are what make a cycle)
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_clipping_ghost_import_cycle():
    assert "jaxdp.clipping" not in _module_imports("ghost")
    assert not {"jaxdp.clipping", "jaxdp.ghost"} & _module_imports("per_example")
    src = (ROOT / "jaxdp" / "clipping.py").read_text()
    assert "except ImportError" not in src


def test_import_jaxdp_fails_when_ghost_cannot_be_imported():
    """If jaxdp.ghost is broken, `import jaxdp` must fail loudly: method='auto' (the default) quietly running as
    'vmap' would hide the breakage (and any bound the ghost path keeps)."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "jaxdp.ghost":
                    raise ImportError("jaxdp.ghost blocked by the test")
                return None
        sys.meta_path.insert(0, Block())
        import jaxdp
        import jax.numpy as jnp
        f = jaxdp.clipped_grad(lambda p, b: jnp.sum(b["x"] * p["w"], 1), 1.0, method="auto")
        f({"w": jnp.ones(2)}, {"x": jnp.ones((2, 2))})
        print("IMPORTED", sorted(jaxdp.per_example.backend_names()) if hasattr(jaxdp, "per_example") else "")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0, out.stdout
    assert "IMPORTED" not in out.stdout
    assert "jaxdp.ghost blocked by the test" in out.stderr


# ----------------------------------------------------------------------------------------------------------
# The registry


def test_builtin_backends_are_registered():
    assert per_example.backend_names()[:3] == ("auto", "vmap", "ghost")
    from jaxdp import ghost
    assert per_example.get_backend("ghost") is ghost.ghost_impl
    assert per_example.get_backend("auto") is ghost.auto_impl
    assert per_example.get_backend("vmap") is per_example.vmap_backend
    assert isinstance(per_example.vmap_backend, per_example.PerExampleBackend)


def test_registry_refuses_what_would_be_a_silent_swap():
    for name in ("vmap", "ghost", "auto"):
        with pytest.raises(ValueError, match="built-in"):
            per_example.register_backend(name, per_example.vmap_backend, replace=True)
        with pytest.raises(ValueError, match="built-in"):
            per_example.unregister_backend(name)
    with pytest.raises(ValueError, match="registered per-example backends.*'vmpa'"):
        jaxdp.clipped_grad(_loss, C, method="vmpa")
    with pytest.raises(ValueError, match="no per-example backend named"):
        per_example.unregister_backend("never_registered")
    with pytest.raises(TypeError, match="callable"):
        per_example.register_backend("not_callable", 3)
    per_example.register_backend("test_twice", per_example.vmap_backend)
    try:
        with pytest.raises(ValueError, match="already registered"):
            per_example.register_backend("test_twice", per_example.vmap_backend)
        per_example.register_backend("test_twice", per_example.vmap_backend, replace=True)
    finally:
        per_example.unregister_backend("test_twice")
    assert "test_twice" not in per_example.backend_names()
    with pytest.warns(DeprecationWarning, match="register_backend"):
        jaxdp.clipping.register_method("test_old_name", per_example.vmap_backend)
    per_example.unregister_backend("test_old_name")


def test_registered_backend_in_clipped_grad_keeps_each_example_within_C(spy):
    """Per-example property: with only example i unmasked, ||S_i|| <= C (float64 check), for a registered name."""
    params, batch = _params(), _batch()
    B = batch["x"].shape[0]
    fn = jax.jit(jaxdp.clipped_grad(_loss, C, method="test_spy"))
    ref_fn = jax.jit(jaxdp.clipped_grad(_loss, C, method="vmap"))
    clipped = 0
    for i in range(B):
        mask = jnp.arange(B) == i
        s, st = fn(params, batch, mask)
        norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(s)))
        assert norm <= C * (1 + 1e-6)
        clipped += float(st.clip_fraction)
        r, _ = ref_fn(params, batch, mask)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(r)):
            np.testing.assert_array_equal(a, b)
    assert clipped >= 3 and spy.calls >= 1   # the bound was exercised (examples scaled down), by the spy


def test_registered_backend_works_in_make_private(spy):
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(b["x"].reshape(-1, 64) @ p["w"] + p["b"], b["y"])

    data = jaxdp.data.load_digits()
    private = engine.make_private(loss_fn=loss_fn, params=params, optimizer=optax.sgd(0.5), dataset_size=256,
                                  batch_size=64, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0, method="test_spy")
    state = private.init()
    for batch, mask in private.batches({"x": data.x_train[:256], "y": data.y_train[:256]}, 1):
        state, _ = private.step(state, batch, mask)
    assert spy.calls >= 1 and private.steps_taken == 1
    with pytest.raises(ValueError, match="registered per-example backends"):
        engine.make_private(loss_fn=loss_fn, params=params, optimizer=optax.sgd(0.5), dataset_size=256,
                            batch_size=64, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0, method="nope")


def test_registered_backend_works_as_training_method(spy, tmp_path):
    from jaxdp.train import ConfigError, DPTrainer
    cfg = {
        "model": {"name": "logreg"}, "data": {"name": "digits"},
        "optimizer": {"name": "sgd", "learning_rate": 2.0},
        "training": {"epochs": 1, "batch_size": 256, "seed": 7, "accountant": "rdp", "method": "test_spy",
                     "dp": {"enabled": True, "epsilon": None, "delta": 1e-5, "max_grad_norm": 1.0,
                            "noise_multiplier": 1.0}},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    DPTrainer(cfg, log=False).train()
    assert spy.calls >= 1
    cfg["training"]["method"] = "gohst"
    cfg["output"]["dir"] = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match=r"training\.method.*auto, vmap, ghost.*'gohst'"):
        DPTrainer(cfg, log=False)


def test_a_backend_must_return_the_weights_it_was_given():
    def no_weights(loss_fn, has_aux, params, batch, weight_fn):
        out = per_example.vmap_backend(loss_fn, has_aux, params, batch, weight_fn)
        return out.summed, out.sq_norms, out.losses, out.aux
    per_example.register_backend("test_no_weights", no_weights)
    try:
        with pytest.raises(TypeError, match="BackendOutput"):
            jaxdp.clipped_grad(_loss, C, method="test_no_weights")(_params(), _batch())
    finally:
        per_example.unregister_backend("test_no_weights")


# ----------------------------------------------------------------------------------------------------------
# Pure weight functions


def test_clip_weights_is_a_pure_function_of_the_norms():
    groups = per_example.ClipGroups((1.0, 2.0), ("a", "b"), (0, 1, 1))
    sq = [jnp.array([4.0, 0.25, jnp.nan, 1.0, 9.0]), jnp.array([0.0, 1.0, 1.0, -1.0, 16.0]),
          jnp.array([16.0, 0.0, 1.0, 0.0, 0.0])]
    mask = jnp.array([True, True, True, True, False])
    cw = per_example.clip_weights(sq, mask, groups)
    again = per_example.clip_weights(sq, mask, groups)
    assert isinstance(cw, per_example.ClipWeights)
    for a, b in zip(jax.tree.leaves(cw), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    w = [np.asarray(x) for x in cw.leaf_weights]
    # example 0: group a norm 2 > C_a = 1 -> 1/(2 + 1e-6); group b norm 4 > C_b = 2 -> 2/(4 + 1e-6)
    np.testing.assert_allclose([w[0][0], w[1][0], w[2][0]], [1 / 2, 1 / 2, 1 / 2], rtol=1e-6)
    # example 1: within both bounds -> 1; examples 2 (NaN) and 3 (negative) dropped; 4 is padding
    assert [w[k][1] for k in range(3)] == [1.0, 1.0, 1.0]
    assert all(w[k][j] == 0.0 for k in range(3) for j in (2, 3, 4))
    assert np.asarray(cw.finite).tolist() == [True, True, False, False, True]
    assert np.asarray(cw.group_clipped).tolist() == [[True, False, False, False, False],
                                                     [True, False, False, False, False]]
    assert "out" not in inspect.signature(per_example.clip_weights).parameters


# ----------------------------------------------------------------------------------------------------------
# Keyword-only sigma and C


NOISE_FNS = {
    "add_noise": (jaxdp.add_noise, (), ("noise_multiplier", "l2_clip_norm", "expected_batch_size", "key")),
    "dp_aggregate": (jaxdp.dp_aggregate, (), ("l2_clip_norm", "noise_multiplier", "expected_batch_size", "key")),
    "dpsgd": (jaxdp.dpsgd, (0.1,), ("l2_clip_norm", "noise_multiplier", "expected_batch_size", "key")),
    "dpadam": (jaxdp.dpadam, (0.1,), ("l2_clip_norm", "noise_multiplier", "expected_batch_size", "key")),
    "bandmf_noise": (jaxdp.bandmf_noise, (), ("noise_multiplier", "l2_clip_norm", "expected_batch_size", "key")),
}


@pytest.mark.parametrize("name", sorted(NOISE_FNS))
def test_sigma_and_clip_norm_are_keyword_only(name):
    fn, lead, old_order = NOISE_FNS[name]
    params = inspect.signature(fn).parameters
    for p in ("noise_multiplier", "l2_clip_norm"):
        assert params[p].kind is inspect.Parameter.KEYWORD_ONLY
    values = {"noise_multiplier": 2.0, "l2_clip_norm": 0.5, "expected_batch_size": 4.0, "key": 3}
    extra = {"bands": 1} if name == "bandmf_noise" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the keyword call does not warn
        by_kw = fn(*lead, **values, **extra)
    with pytest.warns(DeprecationWarning, match=r"by keyword.*noise_multiplier=.*|by keyword.*l2_clip_norm="):
        by_pos = fn(*lead, *[values[k] for k in old_order], **extra)
    g = {"w": jnp.full((2, 3), 0.25)} if name == "dp_aggregate" else {"w": jnp.full(3, 0.25)}
    p = {"w": jnp.zeros(3)}
    a, _ = by_kw.update(g, by_kw.init(p), p)
    b, _ = by_pos.update(g, by_pos.init(p), p)
    np.testing.assert_array_equal(a["w"], b["w"])   # the old positional order still means the same thing
    with pytest.raises(TypeError, match="multiple values"):
        fn(*lead, *[values[k] for k in old_order[:2]], **{old_order[0]: 1.0}, **extra)


def test_dp_aggregate_old_positional_order_is_clip_then_sigma():
    """dp_aggregate's old order was (C, sigma): the deprecated positional call maps them the old way."""
    with pytest.warns(DeprecationWarning, match="l2_clip_norm, noise_multiplier"):
        tx = jaxdp.dp_aggregate(0.5, 0.0, 1.0, 0)
    g = {"w": jnp.array([[3.0, 4.0]])}   # norm 5, clipped to C = 0.5, no noise (sigma 0)
    out, _ = tx.update(g, tx.init(None))
    np.testing.assert_allclose(np.linalg.norm(out["w"]), 0.5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Adaptive clipping is built on the public pieces


def test_adaptive_calls_no_private_helper_of_another_module():
    tree = ast.parse((ROOT / "jaxdp" / "adaptive.py").read_text())
    # jaxdp._checks is the package's shared argument validation (a module of public helpers), not another
    # module's private helper.
    imported_private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        for a in n.names if a.name.startswith("_") and a.name != "_checks"]
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names if n.module == "jaxdp"}
    private_attrs = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                     and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")]
    assert imported_private == [] and private_attrs == []
    src = (ROOT / "jaxdp" / "adaptive.py").read_text()
    for reimplemented in ("jax.random.normal", "gaussian_like", "os_entropy_key"):
        assert reimplemented not in src


@pytest.mark.parametrize("secure", [False, True])
def test_adaptive_draws_both_releases_through_add_noise(monkeypatch, secure):
    import jaxdp.adaptive as adaptive
    made = []
    real = jaxdp.add_noise

    def spy_add_noise(**kw):
        made.append(kw)
        return real(**kw)
    monkeypatch.setattr(adaptive, "add_noise", spy_add_noise)
    ada = adaptive.adaptive_clipping(_loss, noise_multiplier=1.0, expected_batch_size=40.0,
                                     key=None if secure else 0, secure=secure)
    sigmas = sorted((k["noise_multiplier"], k["expected_batch_size"]) for k in made)
    assert sigmas == sorted([(ada.effective_noise_multiplier, 40.0), (ada.count_noise_std, 1.0)])
    assert all(k["l2_clip_norm"] == 1.0 and k["secure"] == secure for k in made)
    params, batch = _params(), _batch(40)
    state = ada.init()
    fracs = []
    for _ in range(3):
        update, state, stats = jax.jit(ada.step)(params, batch, None, state)
        fracs.append(float(stats["unclipped_fraction"]))
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(update))
    assert len(set(fracs)) == 3   # fresh count noise every step
