"""A model built on the meta device, materialized by ``prepare`` in its storage formats.

The reference is the same model built eagerly with the same seed and prepared by the same
policy: its values (bit for bit), dtypes, tied parameters and the random generator's state after.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixprec import MixedPrecision
from mixprec.app.tasks.transformer import TinyTransformer

POLICIES = ["fp32", "bf16-mixed", "bf16-pure"]


class Layers(nn.Module):
    """torch's layers, including a tied weight and the MultiheadAttention initializer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 11)
        self.head.weight = self.embed.weight  # tied after both drew their values

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.bn(x.transpose(1, 2)).transpose(1, 2))


def _tiny_transformer() -> nn.Module:
    return TinyTransformer(vocab=11, d_model=16, n_layers=2, n_heads=2, seq_len=8)


def _built(build, meta: bool, policy: str, init=None):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = build()
    else:
        model = build()
    model = MixedPrecision(policy, device="cpu", backend="emulated").prepare(model, init=init)
    return model, torch.get_rng_state()


def _assert_same(meta_model: nn.Module, eager_model: nn.Module) -> None:
    got, want = meta_model.state_dict(), eager_model.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].device == want[name].device, name
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("build", [Layers, _tiny_transformer], ids=["layers", "charlm"])
def test_meta_model_equals_eager(build, policy):
    eager, eager_rng = _built(build, False, policy)
    meta, meta_rng = _built(build, True, policy)
    _assert_same(meta, eager)
    assert torch.equal(meta_rng, eager_rng)  # later draws (data order, dropout) agree too
    assert not any(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    if build is Layers:
        assert meta.head.weight is meta.embed.weight


@pytest.mark.parametrize("policy", POLICIES)
def test_meta_hf_gpt2_equals_eager(policy):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip

    def build() -> nn.Module:
        return transformers.GPT2LMHeadModel(config)

    eager, eager_rng = _built(build, False, policy)
    meta, meta_rng = _built(build, True, policy)
    _assert_same(meta, eager)
    assert torch.equal(meta_rng, eager_rng)
    assert meta.lm_head.weight is meta.transformer.wte.weight


def test_meta_model_trains_like_eager_with_an_optimizer_built_on_meta():
    """An optimizer built on the meta parameters steps the materialized ones, as eagerly."""
    losses = {}
    for meta in (False, True):
        torch.manual_seed(0)
        with torch.device("meta" if meta else "cpu"):
            model = _tiny_transformer()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mp = MixedPrecision("bf16-pure", device="cpu", backend="emulated")
        model, optimizer = mp.prepare(model, optimizer)
        tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(1))
        losses[meta] = []
        for _ in range(2):
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
            mp.backward(loss)
            mp.step(optimizer)
            optimizer.zero_grad()
            losses[meta].append(loss.item())
        losses[meta].append([p.detach().clone() for p in model.parameters()])
    assert losses[True][:2] == losses[False][:2]
    assert all(torch.equal(a, b) for a, b in zip(losses[True][2], losses[False][2], strict=True))


def test_bf16_model_never_exists_in_fp32():
    """While materializing, the fp32 tensors are about one block's, never the model's."""
    policy = "bf16-pure"

    def build() -> nn.Module:
        return TinyTransformer(vocab=11, d_model=32, n_layers=6, n_heads=2, seq_len=8)

    with torch.device("meta"):
        model = build()
    full = sum(p.numel() * 4 for p in model.parameters())
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    peak = [0]

    def init(module: nn.Module) -> None:
        peak[0] = max(peak[0], sum(
            p.numel() * 4 for p in model.parameters() if p.dtype == torch.float32 and not p.is_meta
        ))  # fmt: skip
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    torch.manual_seed(0)
    MixedPrecision(policy, device="cpu", backend="emulated").prepare(model, init=init)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    assert block < peak[0] <= 2 * block < full / 2


class NoInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.linear = nn.Linear(4, 4)


def test_meta_module_without_initializer_is_refused_and_nothing_changes():
    with torch.device("meta"):
        model = NoInit()
    mp = MixedPrecision("bf16-pure", device="cpu", backend="emulated")
    with pytest.raises(ValueError, match=r"\['<root> \(NoInit\)'\].*reset_parameters\(\).*init="):
        mp.prepare(model)
    assert all(p.is_meta for p in model.parameters())

    # The fix the message names: an init function (here the one eager __init__ ran).
    def init(module: nn.Module) -> None:
        if isinstance(module, NoInit):
            nn.init.ones_(module.scale)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    torch.manual_seed(0)
    eager = MixedPrecision("bf16-pure", device="cpu", backend="emulated").prepare(NoInit())
    torch.manual_seed(0)
    _assert_same(mp.prepare(model, init=init), eager)


def test_initializer_leaving_a_parameter_unset_is_refused():
    class Half(NoInit):
        def reset_parameters(self) -> None:  # forgets self.scale
            pass

    with torch.device("meta"):
        model = Half()
    with pytest.raises(ValueError, match=r"Half '<root>'.*parameter 'scale'.*without a value"):
        MixedPrecision("fp32", device="cpu").prepare(model)


class Masked(nn.Module):
    """A causal mask built in ``__init__`` (on meta when the model is)."""

    def __init__(self, dtype: torch.dtype, recompute: bool) -> None:
        super().__init__()
        self.dtype, self.recompute = dtype, recompute
        self.linear = nn.Linear(4, 4)
        self.register_buffer("mask", self._mask())

    def _mask(self) -> torch.Tensor:
        return torch.ones(4, 4, device=self.linear.weight.device).tril().to(self.dtype)

    def reset_parameters(self) -> None:
        if self.recompute:
            self.register_buffer("mask", self._mask())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int64])
def test_meta_buffer_not_recomputed_is_refused(dtype):
    with torch.device("meta"):
        model = Masked(dtype, recompute=False)
    with pytest.raises(ValueError, match=r"Masked '<root>': buffer 'mask'.*reset_parameters"):
        MixedPrecision("bf16-pure", device="cpu", backend="emulated").prepare(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_meta_buffer_recomputed_by_reset_parameters(dtype):
    eager, _ = _built(lambda: Masked(dtype, recompute=True), False, "bf16-pure")
    meta, _ = _built(lambda: Masked(dtype, recompute=True), True, "bf16-pure")
    _assert_same(meta, eager)


def test_init_must_be_callable():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="init must be a callable"):
        MixedPrecision("fp32", device="cpu").prepare(model, init="normal")


def test_init_for_a_model_not_on_meta_is_refused():
    with pytest.raises(ValueError, match="no meta tensors"):
        MixedPrecision("fp32", device="cpu").prepare(nn.Linear(2, 2), init=lambda m: None)
