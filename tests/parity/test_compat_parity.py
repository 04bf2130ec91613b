"""Opacus's expected-batch-size quirk: make_private uses q = 1 / len(data_loader) and E = int(N * q).

jaxdp.compat reproduces both in opacus_compat mode; with them, a jaxdp step on the batch Opacus's Poisson
loader drew equals Opacus's step exactly (noise 0).
"""
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import parity_harness as h
from jaxdp import compat


def _make_private(n, batch_size, module=None, data=None):
    if data is None:
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    if module is None:
        module = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine(accountant="rdp").make_private(
            module=module, optimizer=opt, data_loader=DataLoader(data, batch_size=batch_size),
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=True)


@pytest.mark.parametrize("n,b", [(60_000, 64), (60_000, 256), (1_437, 64), (1_000, 30), (1_000, 10)])
def test_expected_batch_size_quirk_matches_opacus(n, b):
    _, opt, loader = _make_private(n, b)
    q = compat.sample_rate(n, b, opacus_compat=True)
    assert q == loader.sample_rate == 1 / len(loader)
    assert compat.expected_batch_size(n, q, opacus_compat=True) == opt.expected_batch_size
    assert compat.sample_rate(n, b) == b / n
    assert compat.expected_batch_size(n, b / n) == pytest.approx(b)


def test_mnist_example_is_63():
    q = compat.sample_rate(60_000, 64, opacus_compat=True)
    assert q == 1 / 938
    assert compat.expected_batch_size(60_000, q, opacus_compat=True) == 63
    assert compat.expected_batch_size(60_000, q) == pytest.approx(63.966, abs=1e-3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="int"):
        compat.expected_batch_size(10, 0.05, opacus_compat=True)
    with pytest.raises(ValueError):
        compat.sample_rate(10, 20)


def test_make_private_step_equals_jaxdp_compat_step():
    """Full Opacus pipeline (make_private, Poisson loader, E = int(N q)) vs jaxdp with opacus_compat values."""
    pair = h.build("mlp")
    d = h.digits()
    n, b = 1000, 64
    x = d.x_train[:n].reshape(n, -1)
    y = d.y_train[:n]
    torch.manual_seed(0)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    clone = h.TorchMLP()
    clone.load_state_dict(pair.torch_module.state_dict())
    module, opt, loader = _make_private(n, b, module=clone, data=data)
    xb, yb = next(iter(loader))
    assert opt.expected_batch_size == 62  # int(1000 / 16)
    out = module(xb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.nn.functional.cross_entropy(out, yb).backward()
    opt.pre_step()
    o_upd = {name: p.grad.detach().numpy() for name, p in clone.named_parameters()}
    q = compat.sample_rate(n, b, opacus_compat=True)
    e = compat.expected_batch_size(n, q, opacus_compat=True)
    _, _, j_upd = h.jaxdp_step(pair, xb.numpy(), yb.numpy().astype(np.int32), clip=1.0, expected_batch_size=e)
    for name in o_upd:
        np.testing.assert_allclose(j_upd[name], o_upd[name], rtol=h.RTOL, atol=h.ATOL)
    # jaxdp's default E = q N = 62.5 gives a visibly different update (0.8%).
    _, _, j_default = h.jaxdp_step(pair, xb.numpy(), yb.numpy().astype(np.int32), clip=1.0,
                                   expected_batch_size=compat.expected_batch_size(n, q))
    assert not np.allclose(j_default["fc2.bias"], o_upd["fc2.bias"], rtol=h.RTOL, atol=h.ATOL)
