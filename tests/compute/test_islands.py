import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec import Policy
from mixprec.compute import autocast, current_region, fp32_islands


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 4)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        h = self.ln(self.fc(x))
        self.seen = {"ln_out": h.dtype}
        logits = self.lm_head(h)
        self.seen["logits"] = logits.dtype
        return self.loss(logits, y)


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_norms_and_losses_are_fp32_islands_by_default(backend):
    net = Net()
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with fp32_islands(net) as islands, autocast("cpu", backend=backend):
        loss = net(x, y)
    assert set(islands) == {"ln", "loss"}
    assert net.seen == {"ln_out": torch.float32, "logits": torch.bfloat16}
    loss.backward()
    assert net.ln.weight.grad.dtype == torch.float32
    # Inside the island LayerNorm ran in fp32 on the widened 16-bit input: compare to that.
    with autocast("cpu", backend=backend):
        h16 = net.fc(x)
    assert torch.equal(
        net.ln(h16.float()), F.layer_norm(h16.float(), (8,), net.ln.weight, net.ln.bias)
    )


def test_without_islands_layernorm_follows_autocast():
    net = Net()
    with autocast("cpu", backend="emulated"):
        net(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    assert net.seen["ln_out"] == torch.bfloat16


def test_policy_rules_add_islands_by_name():
    net = Net()
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    policy = Policy.parse("bf16-mixed; lm_head -> fp32")
    with fp32_islands(net, policy), autocast("cpu", backend="emulated"):
        net(x, y)
        h = net.ln(net.fc(x))
        logits = net.lm_head(h)
    assert net.seen["logits"] == torch.float32
    assert torch.equal(logits, F.linear(h, net.lm_head.weight, net.lm_head.bias))  # plain fp32


def test_a_16_bit_rule_switches_the_dtype_inside_the_module():
    net = Net()
    policy = Policy.parse("bf16-mixed; fc -> fp16")
    with fp32_islands(net, policy, defaults=False), autocast("cpu", backend="emulated"):
        out = net.fc(torch.randn(2, 8))
    assert out.dtype == torch.float16


def test_hooks_do_nothing_outside_autocast_and_are_removed():
    net = Net()
    handle = fp32_islands(net)
    x = torch.randn(2, 8, dtype=torch.float64)
    assert net.ln.to(torch.float64)(x).dtype == torch.float64  # no cast outside a region
    handle.remove()
    assert not net.ln._forward_hooks and not net.ln._forward_pre_hooks


def test_islands_follow_plain_torch_autocast_too():
    net = Net()
    with fp32_islands(net), torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    assert net.seen["ln_out"] == torch.float32
    assert torch.is_autocast_enabled("cpu") is False


def test_an_exception_inside_an_island_restores_the_region():
    class Boom(nn.LayerNorm):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom(4))
    with fp32_islands(model), autocast("cpu", backend="emulated") as region:
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 4))
        assert current_region().enabled and current_region().dtype == region.dtype
        assert model[0](torch.randn(2, 4)).dtype == torch.bfloat16
    assert current_region() is None


def test_bad_model():
    with pytest.raises(TypeError, match=r"fp32_islands needs an nn.Module, got str 'net'"):
        fp32_islands("net")
