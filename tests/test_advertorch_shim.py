"""The one compatibility shim that lets advertorch 0.2.3 import on current PyTorch."""

from __future__ import annotations

import importlib

import torch

from lightning_pdenets._compat import advertorch as shim


def test_shim_makes_advertorch_attacks_importable():
    attacks = shim.import_advertorch_attacks()
    assert attacks.GradientSignAttack.__name__ == "GradientSignAttack"
    assert attacks.LinfPGDAttack.__name__ == "LinfPGDAttack"
    # the module whose import used to fail is loaded and sees the helper
    fab = importlib.import_module("advertorch.attacks.fast_adaptive_boundary")
    assert fab.zero_gradients is importlib.import_module("torch.autograd.gradcheck").zero_gradients


def test_zero_gradients_zeroes_tensors_and_nested_sequences():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    c = torch.ones(2, requires_grad=True)  # no gradient yet: must be left as None
    (a.sum() * 2 + (b * 3).sum()).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    shim.zero_gradients([a, (b, c)])
    assert torch.equal(a.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(2))
    assert c.grad is None


def test_shim_keeps_an_existing_torch_helper(monkeypatch):
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")

    def torch_own_helper(x):
        return None

    monkeypatch.setattr(gradcheck_module, "zero_gradients", torch_own_helper, raising=False)
    shim.import_advertorch_attacks()
    assert gradcheck_module.zero_gradients is torch_own_helper
