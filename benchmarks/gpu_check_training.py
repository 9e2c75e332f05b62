"""gpu_check's ``scaler`` and ``presets`` sections: ``mixprec.GradScaler`` in lock-step with
``torch.amp.GradScaler``, and the MixedPrecision presets against fp32 and torch.amp loops
(see gpu_check.py)."""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gpu_check_base import OverBudget, Section, synchronize

import mixprec
from mixprec.app.tasks.charlm import stdlib_corpus
from mixprec.app.tasks.transformer import TinyTransformer

# -- section scaler -----------------------------------------------------------------------------


def _twin_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    ).to(device)
    twin = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)
    ).to(device)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _lockstep(
    section: Section, device: torch.device, flavour: str, clip: bool, steps: int
) -> tuple[int, float]:
    """Train twins with torch's and mixprec's scaler; returns (skipped steps, final scale)."""
    ref_model, mp_model = _twin_models(device)
    fused, foreach = flavour == "fused", flavour == "foreach"
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, fused=fused, foreach=foreach)
    mp_opt = torch.optim.AdamW(mp_model.parameters(), lr=1e-3, fused=fused, foreach=foreach)
    # growth every 3 clean steps, so growth and backoff both happen within a few steps
    ref_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_interval=3)
    mp_scaler = mixprec.GradScaler(device.type, init_scale=2.0**16, growth_interval=3)
    generator = torch.Generator(device="cpu").manual_seed(1)
    inject = {4: float("inf"), 9: float("nan")}
    skipped = 0
    for step in range(steps):
        x = torch.randn(32, 64, generator=generator).to(device)
        y = torch.randn(32, 64, generator=generator).to(device)
        before = [p.detach().clone() for p in ref_model.parameters()]
        for model, opt, scaler in ((ref_model, ref_opt, ref_scaler), (mp_model, mp_opt, mp_scaler)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            grad = next(model.parameters()).grad
            if step in inject and grad is not None:
                grad.view(-1)[0] = inject[step]
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        ref_skipped = all(
            torch.equal(b, p) for b, p in zip(before, ref_model.parameters(), strict=True)
        )
        skipped += ref_skipped
        what = f"AdamW {flavour}{' + clip' if clip else ''} step {step}"
        section.record(
            ref_scaler.get_scale() == mp_scaler.get_scale(),
            f"{what}: scale torch {ref_scaler.get_scale()} vs mixprec {mp_scaler.get_scale()}",
        )
        section.record(
            mp_scaler.step_skipped() == ref_skipped,
            f"{what}: torch skipped={ref_skipped}, "
            f"mixprec step_skipped()={mp_scaler.step_skipped()}",
        )
        same = all(
            torch.equal(a, b)
            for a, b in zip(ref_model.parameters(), mp_model.parameters(), strict=True)
        )
        section.record(same, f"{what}: weights differ")
        if step in inject:
            section.record(ref_skipped, f"{what}: an injected {inject[step]} did not skip the step")
    return skipped, ref_scaler.get_scale()


def check_scaler(section: Section, device: torch.device, quick: bool) -> None:
    """mixprec.GradScaler in lock-step with torch.amp.GradScaler on fused and foreach AdamW."""
    steps = 12 if quick else 30
    for flavour in ("fused", "foreach"):
        for clip in (False, True):
            section.check_time(f"AdamW {flavour}")
            skipped, scale = _lockstep(section, device, flavour, clip, steps)
            print(
                f"  AdamW {flavour:<7} {'unscale_+clip' if clip else 'plain':<13} {steps} steps: "
                f"{skipped} skipped, final scale {scale:g}"
            )


# -- section presets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch: int


# the torch loop each mixprec preset should track step by step, and the sanity bounds on losses
TORCH_TWIN = {
    "mixprec fp32": "torch fp32",
    "mixprec bf16-mixed": "torch.amp bf16",
    "mixprec fp16-mixed": "torch.amp fp16+scaler",
}
VS_TORCH_AMP = 0.05
LAST_LOSS_VS_FP32 = 0.10


def _rel_diff(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True))


GPT2 = Sizes(vocab=50257, d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch=8)
SMALL = Sizes(vocab=256, d_model=64, n_layers=2, n_heads=4, seq_len=64, batch=4)


@dataclass
class Trainer:
    """One way of training the model: its step function, losses and step times."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], float]
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def _model(sizes: Sizes, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(
        sizes.vocab, sizes.d_model, sizes.n_layers, sizes.n_heads, sizes.seq_len
    ).to(device)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _torch_trainer(
    name: str, sizes: Sizes, device: torch.device, dtype: torch.dtype | None
) -> Trainer:
    """A hand-written loop: fp32, or torch.autocast with torch.amp.GradScaler (fp16 only)."""
    model = _model(sizes, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = _loss(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return Trainer(name, step)


def _mixprec_trainer(preset: str, sizes: Sizes, device: torch.device) -> Trainer:
    """The five-line MixedPrecision loop on the same model."""
    model = _model(sizes, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    mp = mixprec.MixedPrecision(preset, device=device)
    model, opt = mp.prepare(model, opt)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with mp.autocast():
            loss = _loss(model, x, y)
        mp.backward(loss)
        mp.step(opt)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return Trainer(f"mixprec {preset}", step)


def _batches(
    sizes: Sizes, steps: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of the charlm corpus (bytes as token ids), the same for every trainer."""
    corpus = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        starts = torch.randint(
            0, corpus.numel() - sizes.seq_len - 1, (sizes.batch,), generator=generator
        )
        windows = torch.stack([corpus[s : s + sizes.seq_len + 1] for s in starts.tolist()])
        batches.append((windows[:, :-1].to(device), windows[:, 1:].to(device)))
    return batches


def check_presets(section: Section, device: torch.device, quick: bool, steps: int) -> None:
    """MixedPrecision presets vs fp32 and vs hand-written torch.amp loops: losses and step time."""
    sizes = SMALL if quick or device.type != "cuda" else GPT2
    warmup = 2
    batches = _batches(sizes, steps + warmup, device)
    builders: list[Callable[[], Trainer]] = [
        lambda: _torch_trainer("torch fp32", sizes, device, None),
        lambda: _torch_trainer("torch.amp bf16", sizes, device, torch.bfloat16),
        lambda: _torch_trainer("torch.amp fp16+scaler", sizes, device, torch.float16),
    ]
    for preset in ("fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"):
        builders.append(functools.partial(_mixprec_trainer, preset, sizes, device))
    trainers = []
    for build in builders:
        section.check_time("building the trainers")
        trainers.append(build())
    with torch.device("meta"):  # counted without allocating a copy
        shape = TinyTransformer(
            sizes.vocab, sizes.d_model, sizes.n_layers, sizes.n_heads, sizes.seq_len
        )
    n_params = sum(p.numel() for p in shape.parameters())
    print(
        f"  model: {n_params / 1e6:.1f}M parameters, {sizes.n_layers} layers, d_model "
        f"{sizes.d_model}, seq {sizes.seq_len}, batch {sizes.batch}; {steps} timed steps after "
        f"{warmup} warm-up, variants alternating"
    )
    done = 0
    try:
        for i, (x, y) in enumerate(batches):
            section.check_time(f"step {i}")
            for trainer in trainers[i % len(trainers) :] + trainers[: i % len(trainers)]:
                synchronize(device)
                start = time.perf_counter()
                loss = trainer.step(x, y)  # float(loss) synchronizes
                synchronize(device)
                trainer.losses.append(loss)
                if i >= warmup:
                    trainer.times.append(time.perf_counter() - start)
            done = i + 1
    except OverBudget as err:
        print(f"  {err}: {done} steps done, reporting those")
    if done <= warmup:
        section.record(False, f"presets: only {done} steps ran, none timed")
        return
    by_name = {t.name: t for t in trainers}
    print(
        f"  {'variant':<24}{'median ms':>10}{'first loss':>12}{'last loss':>11}"
        f"{'vs fp32':>10}{'vs torch.amp':>14}"
    )
    for trainer in trainers:
        vs_fp32 = _rel_diff(trainer.losses, by_name["torch fp32"].losses)
        twin = TORCH_TWIN.get(trainer.name)
        vs_twin = _rel_diff(trainer.losses, by_name[twin].losses) if twin else None
        print(
            f"  {trainer.name:<24}{statistics.median(trainer.times) * 1e3:>10.1f}"
            f"{trainer.losses[0]:>12.4f}{trainer.losses[-1]:>11.4f}{vs_fp32:>10.2e}"
            + (f"{vs_twin:>14.2e}" if vs_twin is not None else f"{'':>14}")
        )
        finite = all(math.isfinite(v) for v in trainer.losses)
        section.record(finite, f"{trainer.name}: a loss is not finite: {trainer.losses}")
        last = abs(trainer.losses[-1] - by_name["torch fp32"].losses[-1])
        section.record(
            last <= LAST_LOSS_VS_FP32 * abs(by_name["torch fp32"].losses[-1]),
            f"{trainer.name}: last loss {trainer.losses[-1]:.4f} is more than "
            f"{LAST_LOSS_VS_FP32:.0%} off fp32's {by_name['torch fp32'].losses[-1]:.4f}",
        )
        if vs_twin is not None:
            section.record(
                vs_twin <= VS_TORCH_AMP,
                f"{trainer.name}: losses off {twin}'s by {vs_twin:.2e} (> {VS_TORCH_AMP:.0%})",
            )
    print(
        "  (vs fp32, vs torch.amp: the largest relative loss difference over the steps to the "
        "torch fp32 loop and to the torch.amp loop of the same format)"
    )
    ratios = (
        ("mixprec bf16-mixed", "torch fp32", "bf16-mixed / fp32"),
        ("mixprec bf16-mixed", "torch.amp bf16", "mixprec bf16-mixed / torch.amp bf16"),
        ("mixprec fp16-mixed", "torch.amp fp16+scaler", "mixprec fp16-mixed / torch.amp fp16"),
        ("mixprec fp32", "torch fp32", "mixprec fp32 / torch fp32"),
    )
    for num, den, label in ratios:
        a, b = by_name[num].times, by_name[den].times
        ratio = statistics.median(x / y for x, y in zip(a, b, strict=False))
        print(f"  {label:<40} = {ratio:.3f}")
