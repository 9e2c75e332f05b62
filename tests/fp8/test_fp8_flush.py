"""FP8 underflow/saturation account: counts against a direct computation with torch's casts."""

import pytest
import torch
from torch import nn

from mixprec.compute.fp8_advice import fp8_flush_report
from mixprec.formats import resolve_format


def _reference(x, fmt_name, rowwise):
    """Dynamic scaling by hand: scale = max / amax (per tensor or per row), torch's fp8 cast."""
    fmt = resolve_format(fmt_name)
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().max()
    scale = fmt.max / amax
    if rowwise:  # the rowwise recipe rounds scales down to powers of two
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = (x * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype).float()
    nonzero = x != 0
    flushed = int((nonzero & (q == 0)).sum())
    subnormal = int((nonzero & (q != 0) & (q.abs() < fmt.min_normal)).sum())
    return int(nonzero.sum()), flushed, subnormal


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_flushed_and_subnormal_counts_match_a_direct_computation(recipe):
    torch.manual_seed(0)
    net = nn.Linear(64, 16, bias=False)
    x = torch.randn(32, 64)
    x[:4] *= 1e-6  # tiny rows: under one tensorwise scale they flush, per-row scales save them
    (c_input, c_weight, c_grad) = fp8_flush_report(net, x, lambda out: out.square().sum(), recipe)
    rowwise = recipe == "rowwise"
    assert (c_input.nonzero, c_input.flushed, c_input.subnormal) == _reference(
        x, c_input.format, rowwise
    )
    w = net.weight.detach()
    assert (c_weight.nonzero, c_weight.flushed, c_weight.subnormal) == _reference(
        w, c_weight.format, rowwise
    )
    assert c_input.saturated == c_weight.saturated == c_grad.saturated == 0  # dynamic scales
    if rowwise:
        assert c_input.flushed == 0
    else:
        assert c_input.flushed_fraction > 0.05


def test_the_account_needs_a_linear_layer():
    model = nn.Sequential(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="fp8_flush_report measures linear layers only"):
        fp8_flush_report(model, torch.ones(1, 1, 2), lambda out: out.sum())
