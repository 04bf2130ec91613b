"""Issue 19 (a newcomer's first week): delta >= 1/N refused unless overridden (and then recorded); bad data
refused with the file, the column and the count; shapes checked against the model before training."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tiny
from jaxdp.train import DPTrainer


def tiny_config(tmp_path, data="digits", **dp):
    """tests/tiny.py's run for one epoch, on ``data``."""
    return tiny.tiny_config(tmp_path / "run", epochs=1, data=data, **dp)


def test_train_refuses_delta_at_least_one_over_n_unless_overridden_and_recorded(tmp_path):
    from jaxdp.report.modelcard import build_model_privacy
    with pytest.raises(ValueError, match=r"not below 1/N = 1/1437.*training\.dp\.allow_large_delta: true"):
        DPTrainer(tiny_config(tmp_path, delta=0.01), log=False)
    assert not (tmp_path / "run").exists()
    with pytest.warns(UserWarning, match="not below 1/N"):
        trainer = DPTrainer(tiny_config(tmp_path, delta=0.01, allow_large_delta=True), log=False)
    trainer.train(max_epochs=1)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["delta"] == 0.01 and m["delta_at_least_one_over_n"] is True
    section = build_model_privacy(str(tmp_path / "run"))
    assert "not below 1/N" in section["caveats"][0]


def test_make_private_reports_a_plan_that_cannot_finish():
    import jax.numpy as jnp
    import optax

    import jaxdp
    kw = dict(loss_fn=lambda p, b: jnp.zeros(b["x"].shape[0]), params={"w": jnp.zeros(2)}, optimizer=optax.sgd(0.1),
              dataset_size=1000, batch_size=100, l2_clip_norm=1.0, seed=0, target_epsilon=1.0,
              target_delta=1e-5)
    engine = jaxdp.PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match=r"plan cannot finish: 300 steps .* epochs <= [0-9.]+ .*noise_multiplier >= "):
        private = engine.make_private(noise_multiplier=0.8, epochs=30, **kw)
    assert private.max_steps < private.planned_steps == 300
    fits = jaxdp.PrivacyEngine(accountant="rdp").make_private(noise_multiplier=5.0, epochs=1, **kw)
    assert fits.plan_shortfall() is None


# ------------------------------------------------------------------------------------------- bad data


def _npz(tmp_path, name, x, y):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    return str(path)


RNG = np.random.default_rng(0)
X = RNG.random((60, 4, 4, 1)).astype(np.float32)
Y = np.arange(60) % 3


@pytest.mark.parametrize("name, x, y, match", [
    ("nan", np.where(np.arange(X.size).reshape(X.shape) % 97 == 0, np.nan, X), Y,
     r"x_train: 10 NaN/inf value\(s\), in 10 examples \(0-based rows 0, 6, 12"),
    ("neg", X, Y - 1, r"y_train: 20 negative labels"),
    ("onebased", X, Y + 1, r"labels are 1\.\.3 \(1-based\).*Subtract 1"),
    ("gap", X, np.where(Y == 0, 0, 1000), r"1001 classes of which 999 never occur"),
    ("floaty", X, Y + 0.5, r"60 fractional labels.*e\.g\. 0\.5"),
    ("single", X, np.zeros(60, int), r"single class"),
    ("pix255", np.round(X * 255), Y, r"unscaled 0-255 pixels.*scale=255"),
])
def test_bad_npz_is_refused_with_file_array_and_count(tmp_path, name, x, y, match):
    from jaxdp.data import DataValidationError, load_dataset
    path = _npz(tmp_path, name, x, y)
    with pytest.raises(DataValidationError, match=match) as err:
        load_dataset(path)
    assert path in str(err.value)


def test_npz_scale_option_and_flat_images_with_a_cnn(tmp_path):
    from jaxdp.data import DataValidationError, load_dataset
    d = load_dataset(_npz(tmp_path, "pix", np.round(X * 255), Y), scale=255)
    np.testing.assert_allclose(d.x_train, np.round(X * 255) / 255, rtol=1e-6)
    flat = _npz(tmp_path, "flat", RNG.random((60, 784)).astype(np.float32), Y)
    cfg = tiny_config(tmp_path, data=flat)
    cfg["training"]["batch_size"] = 16   # below the 60 examples (a larger one is refused first)
    cfg["model"] = {"name": "mnist_cnn"}
    with pytest.raises(DataValidationError, match=r"shape \(784,\).*x\.reshape\(-1, 28, 28, 1\)"):
        DPTrainer(cfg, log=False)
    cfg["model"] = {"name": "cnn_small"}
    with pytest.raises(DataValidationError, match=r"takes images \[H, W, C\].*\(784,\)"):
        DPTrainer(cfg, log=False)


def test_csv_nan_names_the_column(tmp_path):
    from jaxdp.data import DataValidationError, load_csv
    path = tmp_path / "t.csv"
    rows = [f"{i},{'nan' if i in (3, 50) else 2 * i},{i % 2}" for i in range(100)]
    path.write_text("age,income,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataValidationError, match=r"t\.csv: features: 2 NaN/inf value\(s\) in column\(s\) "
                                                  r"'income': 2, in 2 examples \(0-based rows 3, 50\)"):
        load_csv(path)
    path.write_text("age,income,label\n" + "\n".join(f"{i},{i},{i % 2 + 0.5}" for i in range(100)) + "\n")
    with pytest.raises(DataValidationError, match=r"label column 'label': 100 fractional labels"):
        load_csv(path)


def test_engine_checks_data_against_dataset_size_and_model():
    import optax

    import jaxdp
    from jaxdp import models
    from jaxdp.data import DataValidationError

    def make(n):
        model = models.create("logreg", (4, 4, 1), 3, seed=0)
        return jaxdp.PrivacyEngine().make_private(
            model=model, loss_fn=lambda m, b: models.cross_entropy(m(b["x"]), b["y"]), optimizer=optax.sgd(0.1),
            dataset_size=n, batch_size=8, noise_multiplier=1.0, l2_clip_norm=1.0, seed=0)

    with pytest.raises(DataValidationError, match=r"dataset_size=50\) but the data given to batches\(\) has 60"):
        next(make(50).batches({"x": X, "y": Y}))
    private = make(60)
    with pytest.raises(DataValidationError, match=r"20 training labels >= 3 .*the model has 3 outputs"):
        next(private.batches({"x": X, "y": np.where(Y == 2, 5, Y)}))
    with pytest.raises(DataValidationError, match=r'data\["x"\]: 1 NaN/inf'):
        next(private.batches({"x": np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), "y": Y}))
    with pytest.raises(DataValidationError, match=r"negative labels"):
        next(private.batches({"x": X, "y": Y - 1}))
    with pytest.raises(DataValidationError, match=r"cannot take the examples.*shape \(5,\)"):
        next(private.batches({"x": RNG.random((60, 5)), "y": Y}))
    batch, mask = next(private.batches({"x": X, "y": Y}))
    assert batch["x"].shape[1:] == (4, 4, 1)
