import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxdp
from jaxdp.validation import ModelValidationError


class BNNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 48, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(48, rngs=rngs)
        self.blocks = nnx.List([nnx.BatchNorm(48, rngs=rngs)])
        self.head = nnx.Linear(48, 3, rngs=rngs)

    def __call__(self, x):
        x = self.blocks[0](self.bn(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(nn.Dense(16)(x)))


def test_nnx_batchnorm_is_listed_with_fix():
    issues = jaxdp.validate(BNNet(nnx.Rngs(0)))
    assert sorted(i.path for i in issues) == ["blocks/0", "bn"]
    assert all("GroupNorm(num_groups=16)" in i.fix for i in issues)  # gcd(32, 48) = 16


def test_fix_replaces_batchnorm_with_groupnorm_keeping_affine_params():
    m = BNNet(nnx.Rngs(0))
    m.bn.scale.value = m.bn.scale.value * 3.0
    jaxdp.fix(m)
    assert jaxdp.validate(m) == []
    assert isinstance(m.bn, nnx.GroupNorm) and m.bn.num_groups == 16
    assert isinstance(m.blocks[0], nnx.GroupNorm)
    assert jnp.allclose(m.bn.scale.value, 3.0)
    # After the fix one example's output no longer depends on the rest of the batch.
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 1))
    alone = m(x[:1])
    together = m(x)[:1]
    assert jnp.allclose(alone, together, atol=1e-5)


def test_linen_batchnorm_detected_and_fix_explains():
    model = LinenBN()
    x = jnp.ones((4, 8))
    variables = model.init(jax.random.key(0), x)
    issues = jaxdp.validate(model, variables, x)
    assert len(issues) == 1 and "GroupNorm" in issues[0].fix
    assert len(jaxdp.validate(model, variables)) == 1  # batch_stats alone reveals it
    with pytest.raises(ModelValidationError, match="nn.GroupNorm"):
        jaxdp.fix(model)


def test_make_private_refuses_batchnorm_model():
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    with pytest.raises(ModelValidationError, match="bn .*BatchNorm"):
        engine.make_private(loss_fn=lambda m, b: m(b["x"]).sum(-1), model=BNNet(nnx.Rngs(0)),
                            optimizer=optax.sgd(0.1), dataset_size=100, batch_size=10, noise_multiplier=1.0,
                            l2_clip_norm=1.0, seed=0)
    model = LinenBN()
    variables = model.init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ModelValidationError):
        engine.make_private(loss_fn=lambda p, b: jnp.zeros(b["x"].shape[0]), model=model, variables=variables,
                            optimizer=optax.sgd(0.1), dataset_size=100, batch_size=10, noise_multiplier=1.0,
                            l2_clip_norm=1.0, seed=0)


class DenseBN(nnx.Module):
    def __init__(self, features, rngs):
        self.dense = nnx.Linear(8, features, rngs=rngs)
        self.bn = nnx.BatchNorm(features, rngs=rngs)
        self.head = nnx.Linear(features, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.bn(self.dense(x))))


def test_fix_never_makes_groups_of_one_feature():
    """Issue 19 item 7: Dense(32) + BatchNorm became GroupNorm(32 groups) = one feature per group, whose output
    is exactly 0 for every input (a constant model)."""
    m = DenseBN(32, nnx.Rngs(0))
    with pytest.warns(UserWarning, match="num_groups=16"):
        jaxdp.fix(m)
    assert isinstance(m.bn, nnx.GroupNorm) and m.bn.num_groups == 16
    x = jax.random.normal(jax.random.key(1), (6, 8))
    normed = m.bn(m.dense(x))
    assert float(jnp.std(normed, axis=0).min()) > 0.1       # not constant across examples
    assert float(jnp.std(m(x), axis=0).min()) > 1e-3
    assert "num_groups=16" in jaxdp.validate(DenseBN(32, nnx.Rngs(0)))[0].fix
    m2 = DenseBN(2, nnx.Rngs(0))
    jaxdp.fix(m2)
    assert m2.bn.num_groups == 1                             # one group of the two features
    with pytest.raises(ModelValidationError, match="single feature"):
        jaxdp.fix(DenseBN(1, nnx.Rngs(0)))
    assert "remove it" in jaxdp.validate(DenseBN(1, nnx.Rngs(0)))[0].fix
