"""mixprec against torch.amp on a CUDA GPU: autocast op lists, GradScaler lock-step, presets.

Five sections, each with a time budget (the whole script stays under 5 minutes on one H200):

- ``fp8``: on GPUs with FP8 units (sm_89+), the native ``torch._scaled_mm`` FP8 linear against
  the emulated one on the same inputs (tensorwise, rowwise), and FP8 vs bf16 GEMM time at
  8192^3; elsewhere it checks that ``auto`` picks the emulated path.
- ``fp4``: on GPUs with block-scaled FP4 units (sm_100+, Blackwell), the native 4-bit linear
  (NVFP4 and MXFP4 on block-scaled ``torch._scaled_mm``) against the emulated one on the same
  inputs and random draws (output, input and weight gradients), and NVFP4 vs bf16 GEMM time at
  8192^3; elsewhere it prints that the section was skipped and why, and checks that ``auto``
  picks the emulated path and that ``native`` is refused with that reason.
- ``autocast``: every case of torch's CUDA autocast op lists
  (``torch.testing._internal.autocast_test_lists.AutocastTestLists``), in fp16 and bf16.
  ``mixprec.autocast(backend="native")`` must give exactly what ``torch.autocast`` gives (dtype
  and values, or the same exception type; within a few ulps only where torch itself does not
  repeat its result); ``backend="emulated"`` the same dtype and values within a few 16-bit ulps,
  or no farther than torch's from an fp64 run of the op on the same rounded inputs (some of
  torch's 16-bit kernels accumulate in 16 bits).
- ``scaler``: ``mixprec.GradScaler`` and ``torch.amp.GradScaler`` on twin models (same weights,
  same batches, fp16 autocast), with AdamW ``fused=True`` and ``foreach=True``, with and without
  ``unscale_`` + gradient clipping, with an inf and a NaN gradient injected: scales, skipped steps
  and weights must be identical at every step.
- ``presets``: ``MixedPrecision`` fp32, bf16-mixed, fp16-mixed and bf16-pure on a GPT-2-sized
  transformer (mixprec's TinyTransformer: 12 layers, d_model 768, 12 heads, seq 1024, GPT-2's
  vocabulary, untied head), beside a plain fp32 loop and hand-written torch.autocast loops (bf16;
  fp16 with ``torch.amp.GradScaler``) on the same model, batches and initial weights. The variants
  alternate step by step; it prints the losses against fp32, the median step times and the ratios
  bf16-mixed / fp32 and mixprec / torch.amp. The data are windows of real text (the charlm corpus,
  bytes as tokens), so nothing is downloaded.

Each section runs in its own ``try``; a failure is printed and the next section runs. The exit code
is 1 if any check failed, else 0. Without a CUDA device the script prints
``no CUDA device: gpu_check skipped`` and exits 0. ``--device cpu`` runs the same checks on the CPU
(torch.autocast and torch.amp.GradScaler support it; presets then use a small model), to exercise
the script on a machine without a GPU; the figures then say nothing about a GPU.

    python benchmarks/gpu_check.py [--sections autocast,scaler,presets] [--quick] [--steps 20]
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import importlib.util
import io
import math
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import mixprec
from mixprec.app.tasks.charlm import stdlib_corpus
from mixprec.app.tasks.transformer import TinyTransformer

SECTIONS = ("autocast", "scaler", "presets", "fp8", "fp4")
BUDGET_S = {"autocast": 60.0, "scaler": 60.0, "presets": 150.0, "fp8": 40.0, "fp4": 40.0}
SKIP_MESSAGE = "no CUDA device: gpu_check skipped"


class OverBudget(Exception):
    """A section ran out of its time budget; the rest of it is skipped."""


class Section:
    """A section's time budget and the checks it counted."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name = name
        self.deadline = time.perf_counter() + budget_s
        self.budget_s = budget_s
        self.passed = 0
        self.failures: list[str] = []

    def check_time(self, what: str) -> None:
        if time.perf_counter() > self.deadline:
            raise OverBudget(f"{self.name}: over its {self.budget_s:.0f} s budget before {what}")

    def record(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL {what}")


# -- section autocast ---------------------------------------------------------------------------


def _autocast_lists(device: torch.device) -> Any:
    """torch's ``AutocastTestLists`` for ``device``.

    The module imports torch's test utilities, which need ``expecttest``; where that is missing,
    the class is read from the module's source and run without them (it uses only torch and
    ``TEST_WITH_ROCM``).
    """
    factory: Any
    try:
        from torch.testing._internal.autocast_test_lists import AutocastTestLists as factory
    except ImportError as err:
        print(f"  (importing torch's autocast test lists failed: {err}; reading them from source)")
        spec = importlib.util.find_spec("torch.testing._internal.autocast_test_lists")
        if spec is None or spec.origin is None:
            raise RuntimeError("torch.testing._internal.autocast_test_lists is missing") from err
        tree = ast.parse(Path(spec.origin).read_text())
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        wanted: list[ast.stmt] = [n for n in classes if n.name == "AutocastTestLists"]
        namespace: dict[str, Any] = {
            "torch": torch,
            "collections": collections,
            "TEST_WITH_ROCM": torch.version.hip is not None,
        }
        exec(compile(ast.Module(body=wanted, type_ignores=[]), spec.origin, "exec"), namespace)
        factory = namespace["AutocastTestLists"]
    return factory(device)


@dataclass(frozen=True)
class Case:
    """One op call from torch's lists: ``module.op(*args, **kwargs)`` and/or ``args[0].op(...)``."""

    where: str
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    module: Any


_MODULES = {"nn": torch._C._nn, "linalg": getattr(torch._C, "_linalg", None), "methods": None}


def _cases(lists: Any) -> Iterator[Case]:
    """Every case of the lists torch's CUDA autocast tests run, as torch's tests read them: a
    third element is kwargs (a dict), an expected output dtype, a module, or a skip flag."""
    names = [n for n in vars(lists) if isinstance(getattr(lists, n), list) and n != "banned"]
    for name in sorted(names):
        prefix = name.split("_")[0]
        module = _MODULES.get(prefix, torch)
        for entry in getattr(lists, name):
            op, args, extras = entry[0], entry[1], entry[2:]
            kwargs: dict[str, Any] = {}
            skip = False
            for extra in extras:
                if isinstance(extra, dict):
                    kwargs = extra
                elif isinstance(extra, (torch.dtype, type(torch))):
                    pass  # the expected dtype, or a module: the comparison is against torch
                else:
                    skip = skip or bool(extra)  # TEST_WITH_ROCM, as torch's tests read it
            if not skip and isinstance(args, tuple):
                yield Case(name, op, args, kwargs, module)


def _call(case: Case) -> list[Any]:
    """The outputs of the module function and the Tensor method variants that exist, or the
    exception (as its type) where the call raises."""
    outputs: list[Any] = []
    if case.module is not None and hasattr(case.module, case.op):
        outputs.append(_try(lambda: getattr(case.module, case.op)(*case.args, **case.kwargs)))
    if hasattr(torch.Tensor, case.op) and isinstance(case.args[0], torch.Tensor):
        method = getattr(case.args[0], case.op)
        outputs.append(_try(lambda: method(*case.args[1:], **case.kwargs)))
    return outputs


def _try(call: Callable[[], Any]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notes for listed ops
            return call()
    except Exception as err:  # the comparison is of exception types
        return type(err)


def _mismatch(ref: Any, out: Any, tolerance: float | None) -> str | None:
    """Why ``out`` differs from ``ref`` (None if it does not). ``tolerance`` None means exact;
    else the dtype must match and values agree within ``tolerance`` relative to ``ref``'s
    largest magnitude."""
    if isinstance(ref, type) or isinstance(out, type):
        return None if ref is out else f"torch gives {_name(ref)}, mixprec {_name(out)}"
    if isinstance(ref, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            return f"torch gives a tensor, mixprec {type(out).__name__}"
        if out.dtype != ref.dtype or out.shape != ref.shape:
            return (
                f"torch gives {ref.dtype} {tuple(ref.shape)}, "
                f"mixprec {out.dtype} {tuple(out.shape)}"
            )
        if tolerance is None or not ref.is_floating_point():
            same = torch.equal(ref, out) or bool(
                ref.is_floating_point()
                and torch.equal(ref.isnan(), out.isnan())
                and torch.equal(ref.nan_to_num(), out.nan_to_num())
            )
            return None if same else f"values differ (max {_max_diff(ref, out):.3g})"
        scale = max(ref.float().nan_to_num().abs().max().item(), 1.0)
        diff = _max_diff(ref, out)
        return (
            None
            if diff <= tolerance * scale
            else f"values differ by {diff:.3g} (> {tolerance:.2g} x {scale:.3g})"
        )
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return f"torch gives {type(ref).__name__} of {len(ref)}, mixprec {type(out).__name__}"
        for r, o in zip(ref, out, strict=True):
            reason = _mismatch(r, o, tolerance)
            if reason:
                return reason
        return None
    return None if ref == out else f"torch gives {ref!r}, mixprec {out!r}"


def _name(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else type(value).__name__ + " result"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().nan_to_num() - b.float().nan_to_num()).abs().max().item()


def _not_reproducible(case: Case, ref: list[Any], device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.autocast itself gives another result when ``case`` runs again."""
    with torch.autocast(device_type, dtype=dtype):
        again = _call(case)
    return _mismatch(ref, again, None) is not None


def _no_less_accurate(case: Case, ref: list[Any], out: list[Any]) -> bool:
    """Whether emulated outputs of ``case`` are as close as torch's to an fp64 control run of
    the op on the same rounded inputs (some of torch's 16-bit kernels, e.g. CPU fp16
    convolutions, accumulate in 16 bits; the emulated GEMM accumulates in fp32)."""
    tensors = [r for r in ref if isinstance(r, torch.Tensor)]
    if len(tensors) != len(ref) or not tensors or _mismatch(ref, out, float("inf")):
        return False  # not all tensors, or dtypes/shapes differ: no excuse
    low = tensors[0].dtype

    def wide(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(low).double()
        if isinstance(value, (tuple, list)):
            return type(value)(wide(v) for v in value)
        return value

    wide_case = Case(case.where, case.op, wide(case.args), case.kwargs, case.module)
    control = _call(wide_case)
    if len(control) != len(ref) or any(isinstance(c, type) for c in control):
        return False
    return all(
        _max_diff(o, c) <= _max_diff(r, c) for r, o, c in zip(ref, out, control, strict=True)
    )


def check_autocast(section: Section, device: torch.device, quick: bool) -> None:
    """Native regions equal torch.autocast; emulated ones give its dtypes and close values."""
    with torch.backends.cudnn.flags(enabled=True, deterministic=True):  # as torch's tests run
        _check_autocast(section, device, quick)


def _check_autocast(section: Section, device: torch.device, quick: bool) -> None:
    lists = _autocast_lists(device)
    cases = list(_cases(lists))
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
    print(f"  {len(cases)} cases from torch's lists, dtypes {', '.join(map(str, dtypes))}")
    for dtype in dtypes:
        tolerance = 4 * torch.finfo(dtype).eps
        counts = {"native": 0, "emulated": 0}
        for case in cases:
            section.check_time(f"{case.op} in {dtype}")
            with torch.autocast(device.type, dtype=dtype):
                ref = _call(case)
            for backend in ("native", "emulated"):
                with mixprec.autocast(device.type, dtype=dtype, backend=backend):
                    out = _call(case)
                reason = _mismatch(ref, out, None if backend == "native" else tolerance)
                if (
                    reason
                    and backend == "native"
                    and _not_reproducible(case, ref, device.type, dtype)
                ):
                    reason = _mismatch(ref, out, tolerance)  # e.g. atomics: no exact answer
                if reason and backend == "emulated" and _no_less_accurate(case, ref, out):
                    reason = None  # torch's own kernel is the less accurate one
                section.record(
                    reason is None, f"{case.where} {case.op} {dtype} {backend}: {reason}"
                )
                counts[backend] += reason is None
        for op, args, module in getattr(lists, "banned", []):
            call = functools.partial(getattr(module, op), *args)
            with torch.autocast(device.type, dtype=dtype):
                ref = [_try(call)]
            for backend in ("native", "emulated"):
                with mixprec.autocast(device.type, dtype=dtype, backend=backend):
                    out = [_try(call)]
                reason = _mismatch(ref, out, None if backend == "native" else tolerance)
                section.record(reason is None, f"banned {op} {dtype} {backend}: {reason}")
        print(
            f"  {dtype}: native equal to torch.autocast in {counts['native']}/{len(cases)} cases, "
            f"emulated within {tolerance:.1e} in {counts['emulated']}/{len(cases)}"
        )


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
                _synchronize(device)
                start = time.perf_counter()
                loss = trainer.step(x, y)  # float(loss) synchronizes
                _synchronize(device)
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


# -- main ---------------------------------------------------------------------------------------


# -- section fp8 --------------------------------------------------------------------------------


def check_fp8(section: Section, device: torch.device, quick: bool) -> None:
    """The native FP8 path (``torch._scaled_mm``) against the emulated one on the same inputs, and
    FP8 vs bf16 GEMM time at a large shape. Needs compute capability 8.9+; elsewhere it says why
    and only checks that ``auto`` chose the emulated path."""
    from mixprec.compute.fp8_linear import Fp8Linear, fp8_backend

    backend, reason = fp8_backend("auto", device, "tensorwise")
    print(f"  fp8 auto backend: {backend} ({reason})")
    if backend != "native":
        section.record(backend == "emulated", "fp8 auto backend is emulated without FP8 units")
        return
    torch.manual_seed(0)
    for recipe in ("tensorwise", "rowwise"):
        section.check_time(f"fp8 {recipe}")
        base = torch.nn.Linear(1024, 512, device=device)
        layers = {
            kind: Fp8Linear.from_linear(base, recipe, backend=kind)
            for kind in ("native", "emulated")
        }
        x = torch.randn(256, 1024, device=device, requires_grad=True)
        outs, grads = {}, {}
        for kind, layer in layers.items():
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            out.float().square().mean().backward()
            outs[kind], grads[kind] = out.detach().float(), x.grad.detach().float()
        for what, got in (("output", outs), ("input grad", grads)):
            scale = got["emulated"].abs().max().item() or 1.0
            diff = (got["native"] - got["emulated"]).abs().max().item() / scale
            print(f"  {recipe:<10} {what:<10} native vs emulated max rel diff {diff:.2e}")
            # the same quantized operands; only the fp32 accumulation order differs
            section.record(diff < 1e-2, f"fp8 {recipe} {what} native vs emulated ({diff:.2e})")
    size = 4096 if quick else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()

    section.check_time("fp8 GEMM timing")
    fp8 = _timed(device, lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
    bf16 = _timed(device, lambda: a16 @ b16)
    flops = 2 * size**3
    print(
        f"  GEMM {size}x{size}: fp8 {flops / fp8 / 1e12:.0f} TFLOP/s, bf16 "
        f"{flops / bf16 / 1e12:.0f} TFLOP/s, fp8 / bf16 time = {fp8 / bf16:.2f}"
    )
    section.record(fp8 < bf16, f"fp8 GEMM faster than bf16 at {size}^3")


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds per call of ``fn``: one warm-up call, then the mean of ten."""
    fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / 10


# -- section fp4 --------------------------------------------------------------------------------

FP4_RECIPES = ("nvfp4", "nvfp4:rht=false,sr_grad=false,weight_blocks=1x16", "mxfp4")


def check_fp4(section: Section, device: torch.device, quick: bool) -> None:
    """The native 4-bit path (block-scaled ``torch._scaled_mm``) against the emulated one on the
    same inputs and random draws, and NVFP4 vs bf16 GEMM time. Needs compute capability 10.0+;
    elsewhere it says the section was skipped and why, and checks the backend choice."""
    from mixprec.compute.fp4_linear import Fp4Linear, fp4_backend
    from mixprec.compute.fp4_native import gemm_args, native_gemm, prepare_operand
    from mixprec.fp4_recipes import Fp4Recipe

    backend, reason = fp4_backend("auto", device)
    print(f"  fp4 auto backend: {backend} ({reason})")
    if backend != "native":
        print(f"  fp4 native checks skipped: {reason}")
        section.record(backend == "emulated", "fp4 auto backend is emulated without FP4 units")
        try:
            fp4_backend("native", device)
        except ValueError as err:
            section.record(reason in str(err), f"fp4 native refused with the reason ({err})")
        else:
            section.record(False, "fp4 backend 'native' was not refused without FP4 units")
        return
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(1024, 512).to(device)
    x = (torch.randn(200, 1024, generator=g) * 3).to(device)  # 200 tokens: padded to 224
    for recipe in FP4_RECIPES:
        section.check_time(f"fp4 {recipe}")
        got: dict[str, dict[str, torch.Tensor]] = {}
        for kind in ("native", "emulated"):
            layer = Fp4Linear.from_linear(base, recipe, backend=kind)
            xr = x.clone().requires_grad_()
            base.weight.grad = None
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(1)  # the same stochastic-rounding draws for both
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = layer(xr)
                out.float().square().mean().backward()
            got[kind] = {
                "output": out.detach().float(),
                "input grad": xr.grad.detach().float(),
                "weight grad": base.weight.grad.detach().float(),
            }
        print(f"  {recipe}")
        for what in ("output", "input grad", "weight grad"):
            native, emulated = got["native"][what], got["emulated"][what]
            scale = emulated.abs().max().item() or 1.0
            diff = (native - emulated).abs().max().item() / scale
            print(f"    {what:<11} native vs emulated max rel diff {diff:.2e}")
            # the same 4-bit operands; the fp32 additions in another order, and NVFP4's tensor
            # scales applied to the sum: a bf16 ulp or so
            section.record(diff < 1e-2, f"fp4 {recipe} {what} native vs emulated ({diff:.2e})")
    size = 4096 if quick else 8192
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    args = gemm_args(prepare_operand(a, Fp4Recipe("nvfp4")), prepare_operand(b, Fp4Recipe("nvfp4")))
    a16, b16 = a.bfloat16(), b.bfloat16()
    section.check_time("fp4 GEMM timing")
    fp4 = _timed(device, lambda: native_gemm(args))
    bf16 = _timed(device, lambda: a16 @ b16.t())
    flops = 2 * size**3
    print(
        f"  GEMM {size}x{size}: nvfp4 {flops / fp4 / 1e12:.0f} TFLOP/s, bf16 "
        f"{flops / bf16 / 1e12:.0f} TFLOP/s, nvfp4 / bf16 time = {fp4 / bf16:.2f}"
    )
    section.record(fp4 < bf16, f"nvfp4 GEMM faster than bf16 at {size}^3")


def _parse_sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown sections {unknown or text!r}; valid sections: {', '.join(SECTIONS)} "
            "(comma-separated, e.g. --sections autocast,scaler)"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        type=_parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases, steps and a small model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (default); cpu runs the same checks on the CPU to exercise the script",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(
            line_buffering=True
        )  # a run killed at its time limit keeps its lines
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    device = torch.device(args.device)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps!r}")
    steps = min(args.steps, 4) if args.quick else args.steps
    print(f"torch {torch.__version__}, mixprec {mixprec.__version__}, device {device}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"GPU: {props.name}, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    runners: dict[str, Callable[[Section], None]] = {
        "autocast": lambda s: check_autocast(s, device, args.quick),
        "scaler": lambda s: check_scaler(s, device, args.quick),
        "presets": lambda s: check_presets(s, device, args.quick, steps),
        "fp8": lambda s: check_fp8(s, device, args.quick),
        "fp4": lambda s: check_fp4(s, device, args.quick),
    }
    failed = False
    started = time.perf_counter()
    for name in args.sections:
        section = Section(name, BUDGET_S[name])
        print(f"\n== {name} (budget {section.budget_s:.0f} s)")
        t0 = time.perf_counter()
        try:
            runners[name](section)
        except OverBudget as err:
            print(f"  {err}; skipped the rest of this section")
        except Exception:
            traceback.print_exc(file=sys.stdout)
            section.failures.append("raised")
            print(f"  FAIL {name}: the section raised (above)")
        failed = failed or bool(section.failures)
        status = "FAILED" if section.failures else "ok"
        print(
            f"== {name}: {status}, {section.passed} checks passed, {len(section.failures)} failed, "
            f"{time.perf_counter() - t0:.0f} s"
        )
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s: "
        f"{'FAILED' if failed else 'all checks passed'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
