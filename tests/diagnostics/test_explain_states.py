"""mp.explain shows each module's optimizer-state format and bytes as the session stores them."""

import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.optim import memory_report


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(100, 128), nn.Linear(128, 256), nn.LayerNorm(256), nn.Linear(256, 10)
    )


def test_explained_state_bytes_equal_the_measured_ones():
    policy = "bf16-lean; class:Embedding -> state=fp32"
    mp = MixedPrecision(policy, "cpu", backend="emulated")
    net = model()
    explained = mp.explain(net)
    net, opt = mp.prepare(net, torch.optim.AdamW(net.parameters()))
    mp.backward(net(torch.randint(0, 100, (4,))).float().sum())
    mp.step(opt)
    measured = memory_report(net, opt).optimizer_state
    steps = 4 * len(list(net.parameters()))  # AdamW's step counters, not states
    assert explained.totals()["states"] == measured - steps
    shown = {m.module_class + m.name: m.states for m in explained.modules}
    assert shown == {
        "Embedding0": "fp32",
        "Linear1": "int8",
        "LayerNorm2": "fp32 (small)",
        "Linear3": "fp32 (small)",  # 2560 elements: below the 4096 that are quantized
    }
    assert "| optimizer states |" in explained.markdown()


def test_fp32_policies_show_fp32_states_at_8_bytes_per_param():
    explained = MixedPrecision("bf16-mixed", "cpu", backend="emulated").explain(model())
    params = sum(p.numel() for p in model().parameters())
    assert explained.totals()["states"] == 8 * params
