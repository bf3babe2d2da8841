"""The regularizer's value and gradient against hand computations, and the hooked in-forward path."""

import math

import pytest
import torch
from torch import nn

from recipe_dist.objective import NormCollector, l2_regularizer, recipe_loss, regularizer_grad, select_weights


def test_value_and_gradient_by_hand():
    w1 = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ||w1|| = 5
    w2 = torch.tensor([[1.0, 2.0], [2.0, 4.0]], requires_grad=True)  # ||w2|| = 5
    reg = l2_regularizer([w1, w2], lam=0.5)
    assert reg.item() == pytest.approx(0.5 * (5 + 5))
    reg.backward()
    # d/dW lam * ||W|| = lam * W / ||W||: not 2*lam*W (that would be weight decay).
    assert torch.allclose(w1.grad, torch.tensor([[0.3, 0.4]]))
    assert torch.allclose(w2.grad, 0.5 * torch.tensor([[1.0, 2.0], [2.0, 4.0]]) / 5)
    assert torch.allclose(regularizer_grad(w2.detach(), 0.5), w2.grad)


def test_frobenius_not_squared():
    w = torch.full((3, 4), 2.0)
    assert l2_regularizer([w], 1.0).item() == pytest.approx(math.sqrt(12 * 4.0))


def test_recipe_loss_combines_terms():
    assert recipe_loss(torch.tensor(2.0), torch.tensor(3.0), pt_weight=0.0).item() == 3.0
    assert recipe_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == 5.0


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_hooked_norms_equal_direct_and_give_same_gradients():
    x = torch.randn(5, 4)
    hooked, plain = TwoLayer(), TwoLayer()
    names = select_weights(hooked, [r"^a\.weight$", r"^b\.weight$"])
    assert names == ["a.weight", "b.weight"]
    col = NormCollector(hooked, names)
    out_h = hooked(x)
    loss_h = out_h.pow(2).mean() + col.regularizer(0.7)
    loss_h.backward()
    out_p = plain(x)
    loss_p = out_p.pow(2).mean() + l2_regularizer([plain.a.weight, plain.b.weight], 0.7)
    loss_p.backward()
    assert torch.allclose(out_h, out_p)
    assert torch.allclose(loss_h, loss_p)
    for (n, ph), (_, pp) in zip(hooked.named_parameters(), plain.named_parameters()):
        assert torch.allclose(ph.grad, pp.grad, atol=1e-7), n


def test_unused_regularized_weight_is_an_error():
    m = TwoLayer()
    col = NormCollector(m, ["a.weight"])
    with pytest.raises(RuntimeError, match="a.weight"):
        col.regularizer(1.0)
