"""memory_report: figures equal the sums of the tensors' bytes and match the expected B/param."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec.optim import (
    KahanOptimizer,
    MasterWeightOptimizer,
    MemoryReport,
    StochasticRoundingOptimizer,
    memory_report,
)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)).to(dtype)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(state) -> list[torch.Tensor]:
    return [t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)]


CASES = {
    # name: (param dtype, how to build the optimizer, expected bytes per parameter)
    "fp32 AdamW": (torch.float32, lambda ps: torch.optim.AdamW(ps), 16),
    "bf16 + fp32 master + AdamW": (
        torch.bfloat16,
        lambda ps: MasterWeightOptimizer(torch.optim.AdamW(ps)),
        16,
    ),
    "bf16 + fp32 master with kept fp32 grads + AdamW": (
        torch.bfloat16,
        lambda ps: MasterWeightOptimizer(torch.optim.AdamW(ps), keep_grad_buffers=True),
        20,
    ),
    "bf16 + stochastic rounding + AdamW": (
        torch.bfloat16,
        lambda ps: StochasticRoundingOptimizer(torch.optim.AdamW(ps)),
        12,
    ),
    "bf16 + stochastic rounding + bf16 AdamW states": (
        torch.bfloat16,
        lambda ps: StochasticRoundingOptimizer(torch.optim.AdamW(ps), state_dtype=torch.bfloat16),
        8,
    ),
    "bf16 + Kahan + AdamW": (torch.bfloat16, lambda ps: KahanOptimizer(torch.optim.AdamW(ps)), 14),
    "pure bf16 AdamW": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expected_bytes_per_parameter(case):
    dtype, build, expected = CASES[case]
    model = _model(dtype)
    opt = build(model.parameters())
    _step(model, opt)
    report = memory_report(model, opt)
    # Step counters add 4 bytes per tensor (4 tensors over 393,984 elements): a rounding error.
    assert report.per_param["total"] == pytest.approx(expected, abs=1e-3)


def test_figures_equal_the_sums_of_tensor_bytes():
    model = _model(torch.bfloat16)
    model[0].to(torch.float32)  # an fp32 island: its own master, no copy
    opt = MasterWeightOptimizer(torch.optim.Adam(model.parameters()))
    _step(model, opt)
    report = memory_report(model, opt)
    params = list(model.parameters())
    assert report.num_params == sum(p.numel() for p in params)
    assert report.params == _nbytes(params)
    assert report.grads == _nbytes(p.grad for p in params)
    masters = [m for p, m in zip(params, opt.master_params(), strict=True) if m is not p]
    assert len(masters) == 2
    assert report.master == _nbytes(masters) == 4 * sum(m.numel() for m in masters)
    assert report.optimizer_state == _nbytes(_state_tensors(opt.optimizer.state))
    assert report.compensation == 0
    assert report.total == sum(
        getattr(report, part)
        for part in ("params", "grads", "master", "optimizer_state", "compensation")
    )

    kahan_model = _model(torch.bfloat16)
    kahan = KahanOptimizer(torch.optim.SGD(kahan_model.parameters(), lr=0.1, momentum=0.9))
    _step(kahan_model, kahan)
    report = memory_report(kahan_model, kahan)
    params = list(kahan_model.parameters())
    assert report.compensation == _nbytes(kahan.compensation(p) for p in params)
    assert report.optimizer_state == _nbytes(_state_tensors(kahan.optimizer.state))
    assert report.master == 0  # the fp32 scratch copies exist only inside step()


def test_model_only_and_str():
    model = _model(torch.float32)
    report = memory_report(model)
    assert isinstance(report, MemoryReport)
    assert report.per_param["params"] == 4.0
    assert report.grads == report.optimizer_state == 0
    text = str(report)
    assert "393,984 parameters" in text
    assert "params" in text and "total" in text and "4.00" in text


def test_errors():
    with pytest.raises(TypeError, match=r"expects an nn.Module, got list"):
        memory_report([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expects a torch.optim.Optimizer \(or None\), got dict"):
        memory_report(nn.Linear(2, 2), {})  # type: ignore[arg-type]


def test_one_process_figures_are_their_own_global_figures_and_show_the_reduction():
    model = _model(torch.float32)
    model[2].requires_grad_(False)  # frozen: no gradient to reduce
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    _step(model, opt)
    report = memory_report(model, opt)
    assert report.global_ is not None and not report.sharded
    assert report.global_.global_ is None
    for part in ("params", "grads", "master", "optimizer_state", "compensation", "workspace"):
        assert getattr(report.global_, part) == getattr(report, part), part
    assert report.local_params == report.num_params
    trainable = model[0].weight.numel() + model[0].bias.numel()
    assert report.grad_elements == trainable
    assert report.reduce_bytes_per_step == {
        "fp32": trainable * torch.float32.itemsize,
        "bf16": trainable * torch.bfloat16.itemsize,
        "fp16": trainable * torch.float16.itemsize,
    }
    text = str(report)
    assert "global bytes" not in text  # one column where nothing is sharded
    assert f"fp32 {4 * trainable:,}, bf16 {2 * trainable:,}" in text
