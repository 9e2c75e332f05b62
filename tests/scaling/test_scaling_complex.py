"""Complex parameters (left in their dtype by every policy) under loss scaling."""

import pytest
import torch

import mixprec
from mixprec import GradScaler


def _complex_grad_step(scaler, grad):
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler.scale(torch.ones(()))  # as a loop's scaler.scale(loss).backward() would
    param.grad = grad * scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return param.detach()


def test_complex_gradients_are_unscaled_and_checked():
    grad = torch.tensor([1 + 2j, -3j, 0.5], dtype=torch.complex64)
    stepped = _complex_grad_step(GradScaler("cpu", init_scale=1024.0), grad)
    assert torch.equal(stepped, -grad)  # the reference: plain SGD on the unscaled gradient
    scaler = GradScaler("cpu", init_scale=1024.0)
    bad = torch.tensor([1 + 2j, complex(0, float("inf")), 0.5], dtype=torch.complex64)
    assert torch.equal(_complex_grad_step(scaler, bad), torch.zeros(3, dtype=torch.complex64))
    assert scaler.get_scale() == 512.0  # an inf in an imaginary part skips the step


@pytest.mark.parametrize("preset", ["bf16-mixed", "fp16-mixed", "bf16-pure"])
def test_a_model_with_a_complex_parameter_trains_under_every_preset(preset):
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.phase = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))

        def forward(self, x):
            return self.lin(x).float() * self.phase.abs()

    model = Model()
    before = model.phase.detach().clone()
    mp = mixprec.MixedPrecision(preset, backend="emulated")
    model, optimizer = mp.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))
    assert model.phase.dtype == torch.complex64  # non-real parameters keep their dtype
    with mp.autocast():
        loss = model(torch.randn(2, 4)).square().mean()
    mp.backward(loss)
    report = mp.step(optimizer)
    assert report.stepped and not torch.equal(model.phase.detach(), before)
