"""Where the memory and the precision go: per module, the format and bytes of every part.

Design note: the explanation is read from the policy exactly as a session applies it (the storage
rules with the default FP32 islands, as :func:`~mixprec.optim.cast_module` casts; the compute
format inherited down from an island, as :func:`~mixprec.compute.fp32_islands` runs it) and from
one measured forward of an example batch. The parts of each module:

* *weights*: its own parameters in their storage format;
* *compute*: the format its matmuls run in, and the casts around it (fp32 weights cast to 16 bits
  on every forward; 16-bit inputs widened into an fp32 island; outputs cast to the output format);
* *saved activations*: the bytes autograd keeps for backward while the module (not a child)
  runs, measured with ``torch.autograd.graph.saved_tensors_hooks`` on a copy of the model, cast
  and run under the policy; parameters and autocast's weight copies are not activations;
* *gradients*: one per parameter, in the parameter's format;
* *master*: the fp32 copy an optimizer wrapper keeps of 16-bit parameters (when the policy's
  master format is wider than the parameters);
* *optimizer states*: AdamW's two moments in the module's ``state`` format, as the session
  stores them (by the policy's own rules, not the FP32 islands'), at their stored bytes: codes
  and block scales for int8/fp8, fp32 where a parameter is too small to quantize
  (:mod:`mixprec.optim.state_bytes`, the arithmetic the memory plan uses);
* *reduce*: the format gradients are all-reduced in across processes.

Loss scaling multiplies every gradient of the backward (activations and parameters); it is on
where any format a gradient lives in has fewer exponent bits than fp32 (fp16, fp8).

Cost: one forward of the example on a deep copy (no backward); without an example, no activation
column.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.compute import Backend, autocast, fp32_islands
from mixprec.diagnostics._checks import check_model, split_batch
from mixprec.diagnostics.finite import floating_tensors
from mixprec.diagnostics.layerwise import session_storage
from mixprec.formats import FP32, Format
from mixprec.optim.cast import cast_module
from mixprec.optim.state_bytes import state_bytes, stored_format
from mixprec.policy import Policy

__all__ = ["Explanation", "ModuleExplanation", "explain"]

_LOW = (torch.float16, torch.bfloat16)
_VIEW_NODES = frozenset(
    {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ExpandBackward0",
     "UnsafeViewBackward0", "AsStridedBackward0", "SqueezeBackward0", "UnsqueezeBackward0"}
)  # fmt: skip


@dataclass(frozen=True)
class ModuleExplanation:
    """One module's parts: formats and bytes (its own parameters only, not its children's).

    Attributes:
        name, module_class: the module (``""`` is the model's own code).
        num_params: elements of its own parameters.
        weights, compute, gradients, master, reduce: format names (``"-"``: no such part).
        saved: the formats of the activations it saves for backward (``"-"``: none).
        weight_bytes, gradient_bytes, master_bytes, saved_bytes: bytes of each part.
        states, state_bytes: the format of its parameters' optimizer states (AdamW's two
            moments) and their stored bytes.
        casts: the casts between the parts, in words.
        loss_scaled: its gradients are computed on the scaled loss.
    """

    name: str
    module_class: str
    num_params: int
    weights: str
    compute: str
    saved: str
    gradients: str
    master: str
    reduce: str
    weight_bytes: int
    saved_bytes: int
    gradient_bytes: int
    master_bytes: int
    casts: str
    loss_scaled: bool
    states: str = "-"
    state_bytes: int = 0


@dataclass(frozen=True)
class Explanation:
    """The per-module explanation of a policy on a model; ``markdown()`` and ``plot()`` draw it.

    Attributes:
        policy: the policy explained, as a string.
        loss_scaling: whether the backward runs on a scaled loss.
        modules: one entry per module that has parameters or saves activations.
    """

    policy: str
    loss_scaling: bool
    modules: tuple[ModuleExplanation, ...]

    def totals(self) -> dict[str, int]:
        """Bytes per part over all modules: weights, saved, gradients, master, states."""
        return {
            "weights": sum(m.weight_bytes for m in self.modules),
            "saved": sum(m.saved_bytes for m in self.modules),
            "gradients": sum(m.gradient_bytes for m in self.modules),
            "master": sum(m.master_bytes for m in self.modules),
            "states": sum(m.state_bytes for m in self.modules),
        }

    def markdown(self) -> str:
        """A markdown table, one row per module, with a totals row and the loss-scaling note."""
        head = (
            "| module | class | params | weights | compute | saved activations | gradients "
            "| master | optimizer states | reduce | casts |\n"
            "|---|---|---:|---|---|---|---|---|---|---|---|"
        )
        rows = [head]
        for m in self.modules:
            rows.append(
                f"| {m.name or '<model>'} | {m.module_class} | {m.num_params} "
                f"| {m.weights} {_size(m.weight_bytes)} | {m.compute} "
                f"| {m.saved} {_size(m.saved_bytes)} | {m.gradients} {_size(m.gradient_bytes)}"
                f"{' (scaled)' if m.loss_scaled else ''} | {m.master} {_size(m.master_bytes)} "
                f"| {m.states} {_size(m.state_bytes)} | {m.reduce} | {m.casts} |"
            )
        t = self.totals()
        rows.append(
            f"| **total** | | {sum(m.num_params for m in self.modules)} "
            f"| {_size(t['weights'])} | | {_size(t['saved'])} | {_size(t['gradients'])} "
            f"| {_size(t['master'])} | {_size(t['states'])} | | |"
        )
        note = (
            "loss scaling: on; the loss is multiplied by the scale before backward, so every "
            "activation and parameter gradient is scaled, and the gradients are unscaled before "
            "clipping and the optimizer step"
            if self.loss_scaling
            else "loss scaling: off (no gradient lives in a format narrower than fp32's range)"
        )
        return f"policy: `{self.policy}`\n\n" + "\n".join(rows) + f"\n\n{note}\n"

    def __str__(self) -> str:
        return self.markdown()

    def plot(self, path: str | Path) -> Path:
        """Draw the bytes per part of each module as stacked bars, labelled with the formats.

        Args:
            path: the PNG to write (its folder is created).

        Returns:
            The path written.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mods = list(self.modules)
        parts = [
            ("weights", "weight_bytes", "weights", "#4c72b0"),
            ("gradients", "gradient_bytes", "gradients", "#dd8452"),
            ("master", "master_bytes", "master", "#55a868"),
            ("optimizer states", "state_bytes", "states", "#8172b3"),
            ("saved activations", "saved_bytes", "saved", "#c44e52"),
        ]
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(mods) + 1.8))
        left = [0.0] * len(mods)
        widest = max(
            (sum(getattr(m, a) for _, a, _, _ in parts) / 2**10 for m in mods), default=0.0
        )
        labels = [f"{m.name or '<model>'} [{m.compute}]" for m in mods]
        for title, attr, fmt_attr, colour in parts:
            widths = [getattr(m, attr) / 2**10 for m in mods]
            bars = ax.barh(labels, widths, left=left, color=colour, label=title)
            for bar, m, w in zip(bars, mods, widths, strict=True):
                if w > 0.06 * widest:  # label only bars wide enough to hold the text
                    ax.text(
                        bar.get_x() + w / 2,
                        bar.get_y() + bar.get_height() / 2,
                        getattr(m, fmt_attr),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white",
                    )
            left = [a + w for a, w in zip(left, widths, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("KiB")
        scaling = "loss scaling on: all gradients scaled" if self.loss_scaling else "no scaling"
        ax.set_title(f"{self.policy}  ({scaling}); [compute format]", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _size(n: int) -> str:
    if n == 0:
        return ""
    for unit, step in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def _format_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _bytes_of(fmt: Format) -> int:
    return torch.empty((), dtype=fmt.dtype).element_size() if fmt.dtype is not None else 4


def _narrow(policy: Policy) -> bool:
    policies = (policy, *(rule.policy for rule in policy.rules))
    return any(
        fmt.exponent_bits < FP32.exponent_bits
        for p in policies
        for fmt in (p.param, p.compute, p.output, p.reduce)
    )


def is_weight_copy(t: torch.Tensor, params: Container[int]) -> bool:
    """Autocast's dtype cast of a parameter (or a view of one): a weight copy, no activation.

    ``params``: the data pointers of the parameters' storages. A cast of another leaf (a model
    input that needs a gradient) is an activation.
    """
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEW_NODES:
        fn = fn.next_functions[0][0] if fn.next_functions else None
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    leaves = (
        getattr(f, "variable", None)  # AccumulateGrad's parameter
        for f, _ in fn.next_functions
        if f is not None and type(f).__name__ == "AccumulateGrad"
    )
    return any(v is not None and v.untyped_storage().data_ptr() in params for v in leaves)


def _saved_per_module(
    twin: nn.Module,
    example: Any,
    run: Callable[[nn.Module, Any], Any],
    outputs: dict[str, torch.dtype],
) -> dict[str, dict[int, tuple[int, torch.dtype]]]:
    """Saved-tensor storages by the innermost module running when autograd saved them.

    Also records each module's floating output dtype in ``outputs`` (what it really computed in:
    an embedding stays fp32 under autocast, a linear layer does not).
    """
    params = {p.untyped_storage().data_ptr() for p in twin.parameters()}
    stack: list[str] = [""]
    saved: dict[str, dict[int, tuple[int, torch.dtype]]] = {}
    seen: set[int] = set()
    handles = []

    def enter(name: str, *_: Any) -> None:
        stack.append(name)

    def leave(name: str, module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()
        dtypes = {t.dtype for t in floating_tensors(output)}
        if len(dtypes) == 1:
            outputs[name] = dtypes.pop()

    for name, module in twin.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(functools.partial(enter, name)))
            handles.append(
                module.register_forward_hook(functools.partial(leave, name), always_call=True)
            )

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and not is_weight_copy(t, params):
            seen.add(ptr)
            saved.setdefault(stack[-1], {})[ptr] = (storage.nbytes(), t.dtype)
        return t.detach()  # not t: a saved output would hold itself in a cycle through C++

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(twin, example)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def _forward(model: nn.Module, example: Any) -> Any:
    inputs, _ = split_batch(example)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def explain(
    model: nn.Module,
    policy: Policy | str,
    example: Any = None,
    *,
    backend: Backend = "auto",
) -> Explanation:
    """Explain, module by module, where ``policy`` puts the precision and the memory of ``model``.

    Args:
        model: the model (deep-copied for the measured forward; left untouched).
        policy: the policy, e.g. ``"fp16-mixed"``.
        example: an example batch for the saved-activation column: a tensor, a dict of keyword
            arguments or ``(inputs, target)`` (the target is not used). None: no activations.
        backend: the autocast backend for the measured forward.

    Returns:
        An :class:`Explanation`; ``str()`` is its markdown table, ``.plot(path)`` its PNG.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a batch of the wrong form.
        ValueError: a model without parameters; an unknown policy.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> result = explain(model, "bf16-pure")
        >>> [(m.name, m.weights, m.compute, m.weight_bytes) for m in result.modules]
        [('0', 'bf16', 'bf16', 40), ('1', 'fp32', 'fp32', 32)]
    """
    check_model(model, "explain")
    policy = Policy.parse(policy)
    storage = session_storage(policy)
    scaled = _narrow(policy)
    saved: dict[str, dict[int, tuple[int, torch.dtype]]] = {}
    measured: dict[str, torch.dtype] = {}
    if example is not None:
        twin = copy.deepcopy(model)
        cast_module(twin, storage)
        device = next(twin.parameters()).device
        low = policy.compute.dtype if policy.compute.dtype in _LOW else None
        with fp32_islands(twin, policy):
            with autocast(device.type, dtype=low, enabled=low is not None, backend=backend):
                saved = _saved_per_module(twin, example, _forward, measured)
    compute: dict[str, Policy] = {}
    owner: dict[int, str] = {}  # parameter -> the first module that holds it (tied weights)
    rows = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        rule = storage.for_module(name, module)
        matched = any(r.matches(name, module) for r in storage.rules)
        effective = rule if matched or parent is None else compute.get(parent, rule)
        compute[name] = effective
        held = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        tied = [f"{n} = {owner[id(p)]}.{n}" for n, p in held if id(p) in owner]
        own = [p for _, p in held if id(p) not in owner]
        owner.update((id(p), name) for p in own)
        stored = rule.param
        numel = sum(p.numel() for p in own)
        states = policy.for_module(name, module).state  # the session's choice: no islands
        tensors = saved.get(name, {})
        if not held and not tensors:
            continue
        fmt = _format_name(measured[name]) if name in measured and not module._modules else None
        computed = fmt or str(effective.compute)
        saved_fmts = sorted({_format_name(d) for _, d in tensors.values()})
        has_master = bool(own) and policy.master.bits > stored.bits
        casts = [f"tied: {t} (counted there)" for t in tied]
        if held and computed in ("fp16", "bf16") and stored.bits > 16:
            casts.append(f"weights {stored}→{computed} each forward")
        if effective.compute.bits > 16 and policy.compute.bits <= 16:
            casts.append("16-bit inputs widened to fp32 (island)")
        if matched and effective.output != effective.compute:
            casts.append(f"outputs →{effective.output}")
        if has_master:
            casts.append(f"update in {policy.master} master, copied back to {stored}")
        rows.append(
            ModuleExplanation(
                name=name,
                module_class=type(module).__name__,
                num_params=numel,
                weights=str(stored) if held else "-",
                compute=computed,
                saved=", ".join(saved_fmts) or "-",
                gradients=str(stored) if held else "-",
                master=str(policy.master) if has_master else "-",
                reduce=str(policy.reduce) if held else "-",
                weight_bytes=numel * _bytes_of(stored),
                saved_bytes=sum(n for n, _ in tensors.values()),
                gradient_bytes=numel * _bytes_of(stored),
                master_bytes=numel * _bytes_of(policy.master) if has_master else 0,
                casts="; ".join(casts) or "-",
                loss_scaled=scaled and bool(held),
                states=stored_format(states, [p.shape for p in own]) if held else "-",
                state_bytes=int(state_bytes(states, numel, shapes=[p.shape for p in own])),
            )
        )
    return Explanation(str(policy), scaled, tuple(rows))
