"""The fixed Gabor features and the gabor_mlp model (data-independent features: Tramer & Boneh 2021)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import models
from jaxdp.data import load_digits


def test_gabor_filters_are_fixed_zero_mean_band_pass_unit_norm():
    bank = models.gabor_filters()
    assert bank.shape == (5, 5, 1, 16)
    np.testing.assert_array_equal(bank, models.gabor_filters())       # no randomness, no data
    np.testing.assert_allclose(bank[:, :, 0, 0::2].sum(axis=(0, 1)), 0.0, atol=1e-6)   # real parts: zero mean
    np.testing.assert_allclose(np.linalg.norm(bank.reshape(25, 16), axis=0), 1.0, rtol=1e-6)
    # orientation 0 (horizontal frequency) answers a vertical grating, not a horizontal one
    xx = np.tile(np.cos(np.pi / 2 * np.arange(8)), (8, 1)).astype(np.float32)
    vert, horiz = jnp.asarray(xx)[None, :, :, None], jnp.asarray(xx.T)[None, :, :, None]
    r = [jax.lax.conv_general_dilated(im, jnp.asarray(bank), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) for im in (vert, horiz)]
    energy = [float(jnp.sum(x[0, 2:6, 2:6, 0] ** 2 + x[0, 2:6, 2:6, 1] ** 2)) for x in r]
    assert energy[0] > 10 * energy[1]


def test_gabor_features_are_per_example_normalised_and_the_model_takes_images():
    d = load_digits()
    x = jnp.asarray(d.x_train[:6])
    f = models.gabor_features(x)
    assert f.shape == (6, 144)                                          # 4 x 4 x (8 moduli + low-pass)
    np.testing.assert_allclose(np.asarray(f.mean(-1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jnp.sqrt(jnp.mean(f ** 2, -1))), 1.0, rtol=1e-4)
    # one example's features do not depend on the rest of the batch (so clipping's sensitivity bound holds)
    np.testing.assert_allclose(np.asarray(models.gabor_features(x[2:3]))[0], np.asarray(f[2]), rtol=1e-5,
                               atol=1e-6)
    assert float(jnp.abs(f[0] - f[1]).max()) > 0.1                      # different digits, different features
    m = models.create("gabor_mlp", (8, 8, 1), 10, hidden=[16])
    assert m(x).shape == (6, 10)
    models.check_model_input(m, (8, 8, 1), 10)
    with pytest.raises(ValueError, match="even"):
        models.create("gabor_mlp", (7, 8, 1), 10)
    with pytest.raises(Exception, match="images"):
        models.create("gabor_mlp", (64,), 10)
