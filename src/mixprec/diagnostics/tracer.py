"""Where did the first inf or NaN come from? Forward and backward, named by module.

Design note: the tracer uses hooks only while it is attached, so a detached or disabled tracer
costs nothing: no hook is registered anywhere.

*Forward.* A forward hook runs after a module's ``forward`` returns, so children report before
their parents and the first module whose output is out of range, in time, is the innermost one
where the problem arose. Only outputs are checked on the hot path (one ``aminmax`` reduction and
one host sync per floating output); the inputs are looked at once, on the failure path: if they
were already out of range, the problem came from the calling module's own code (a functional op
between submodules) or from the batch, and that caller is named instead.

*Backward.* Tensor hooks (not ``register_full_backward_hook``, which breaks on in-place ops) are
put on every module output and input that requires grad during the forward, and on every
parameter while attached. Autograd fires them in the order gradients are produced, so the first
out-of-range gradient is where the problem started: a module whose input (or parameter) gradient
went bad while its output gradient was still in range is named; a bad gradient on a tensor that no
module consumed comes from the caller's own code, or, at the model's output, from the loss or its
scale.

A tied weight (an LM head sharing the embedding matrix) is one tensor with one gradient, the
sum of its uses; the event names every owner (``event.parameters``). Not every non-finite value is
precision's fault: a batch that already holds inf/NaN is bad data (``cause="data"``), and a module
whose own parameter already holds inf/NaN (a NaN embedding row) has bad weights
(``cause="weights"``); neither gets a precision rule as its fix.

"Out of range" means inf or NaN, and with ``fmt`` also a magnitude above that format's max: run
the model in fp32 with ``fmt="fp16"`` and the tracer names the first module that fp16 would
overflow, with the value it reached. Cost when attached: one reduction and one host sync per
module output and per gradient hook (see ``benchmarks/bench_tracer.py``); a debugging tool, not
something to leave on for a whole run.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.diagnostics._checks import check_model
from mixprec.diagnostics.finite import floating_tensors, in_range, tensor_range
from mixprec.formats import BF16, FP32, Format, FormatLike, resolve_format

__all__ = ["NonFiniteEvent", "NonFiniteTracer"]

Phase = Literal["forward", "backward"]
Cause = Literal["data", "weights", "precision"]


@dataclass(frozen=True)
class NonFiniteEvent:
    """The first module where values (forward) or gradients (backward) went out of range.

    Args:
        phase: ``"forward"`` or ``"backward"``.
        module: the module's dotted name; ``""`` is the model itself.
        module_class: the module's class name.
        problem: ``"inf"``, ``"nan"``, ``"inf and nan"`` or ``"above fp16 max"`` (for ``fmt``).
        input_absmax: largest magnitude among the module's floating inputs (in the backward phase:
            of the gradient w.r.t. them); None when there were none.
        output_absmax: the same for the outputs (or the gradient w.r.t. them).
        detail: what happened, in words.
        suggestion: what to change, in words.
        cause: ``"data"`` (the batch already held inf/NaN), ``"weights"`` (a parameter of the
            module already held inf/NaN) or ``"precision"`` (the values went out of range in the
            computation: what a precision rule or a loss scale can fix).
        parameters: for a parameter gradient, the parameter's qualified names; a tied weight
            (an LM head sharing the embedding matrix) has one name per owner.
    """

    phase: Phase
    module: str
    module_class: str
    problem: str
    input_absmax: float | None
    output_absmax: float | None
    detail: str
    suggestion: str
    cause: Cause = "precision"
    parameters: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.phase}: {_display(self.module)} ({self.module_class}): {self.detail}. " + (
            self.suggestion
        )


@dataclass(frozen=True)
class _Role:
    kind: Literal["input", "output", "param"]
    module: str
    extra: str | None = None  # output: the calling module's name; param: the parameter's name


def _display(name: str) -> str:
    return name or "<model>"


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


class NonFiniteTracer:
    """Name the first module whose output (forward) or gradient (backward) went inf/NaN.

    Use it as a context manager around the forward *and* backward of one step (or
    :meth:`attach`/:meth:`detach` for a session). Events are kept until :meth:`reset`.

    Args:
        model: the model to watch; it must have parameters.
        fmt: also treat magnitudes above this format's max as out of range (e.g. ``"fp16"`` on
            an fp32 run names the module fp16 would overflow). Default: only inf and NaN.
        enabled: ``False`` gives a tracer that registers nothing and finds nothing.
        backward: also trace the backward pass.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``fmt`` is not a format.
        ValueError: ``model`` has no parameters; ``fmt`` is an unknown format name.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0), model[0].bias.zero_(), model[1].weight.fill_(1e4)
        >>> with NonFiniteTracer(model, fmt="fp16") as tracer:
        ...     model(torch.ones(2, 4)).sum().backward()
        >>> tracer.forward.module, tracer.forward.problem
        ('1', 'above fp16 max')
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fmt: FormatLike | None = None,
        enabled: bool = True,
        backward: bool = True,
    ) -> None:
        self.model = check_model(model, "NonFiniteTracer")
        self.fmt: Format | None = None if fmt is None else resolve_format(fmt)
        for flag, value in (("enabled", enabled), ("backward", backward)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
        self.enabled = enabled
        self.trace_backward = backward
        self.forward: NonFiniteEvent | None = None
        self.backward: NonFiniteEvent | None = None
        self._limit = math.inf if self.fmt is None else self.fmt.max
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._stack: list[tuple[str, Any]] = []  # (name, inputs) of the modules running now
        self._grad_in_range: set[str] = set()
        self._watched: dict[int, tuple[weakref.ref[torch.Tensor], list[_Role]]] = {}
        self._classes: dict[str, str] = {}
        self._modules: dict[str, nn.Module] = {}
        self._finished: dict[str, int] = {}  # module -> when its forward last returned
        self._clock = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self) -> NonFiniteTracer:
        """Register the hooks (nothing when disabled).

        Raises:
            RuntimeError: the tracer is already attached.
        """
        if self._handles or self._active:
            raise RuntimeError("this NonFiniteTracer is already attached; detach() it first")
        if not self.enabled:
            return self
        self._active = True
        for name, module in self.model.named_modules():
            self._classes[name] = type(module).__name__
            self._modules[name] = module
            pre = functools.partial(self._enter_module, name)
            post = functools.partial(self._leave_module, name)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(post, with_kwargs=True, always_call=True)
            )
        if self.trace_backward:
            # One hook per parameter with every owner: a tied weight (an LM head sharing the
            # embedding) gets one gradient, the sum of both uses, and both names are reported.
            owners: dict[int, tuple[nn.Parameter, list[_Role]]] = {}
            for name, module in self.model.named_modules(remove_duplicate=False):
                self._classes.setdefault(name, type(module).__name__)
                for param_name, param in module.named_parameters(recurse=False):
                    if param.requires_grad:
                        roles = owners.setdefault(id(param), (param, []))[1]
                        if all(r.module != name for r in roles):
                            roles.append(_Role("param", name, param_name))
            for param, roles in owners.values():
                hook = functools.partial(self._on_grad, roles)
                self._handles.append(param.register_hook(hook))
        return self

    def detach(self) -> None:
        """Remove every hook; hooks left on tensors of an unfinished graph become no-ops."""
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watched.clear()
        self._stack.clear()

    def __enter__(self) -> NonFiniteTracer:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the events found so far (call between steps when attached for a whole run)."""
        self.forward = None
        self.backward = None
        self._grad_in_range.clear()

    @property
    def hooks_registered(self) -> int:
        """Module, parameter and leaf-tensor hooks held now (0 when detached or disabled)."""
        return len(self._handles)

    @property
    def first(self) -> NonFiniteEvent | None:
        """The forward event if there is one, else the backward event, else None."""
        return self.forward if self.forward is not None else self.backward

    def summary(self) -> str:
        """One line per event found, or a line saying nothing was found."""
        events = [e for e in (self.forward, self.backward) if e is not None]
        if not events:
            limit = "inf or NaN" if self.fmt is None else f"inf, NaN or above {self.fmt} max"
            return f"no module output or gradient was {limit}"
        return "\n".join(str(e) for e in events)

    # -- forward --------------------------------------------------------------------------------

    def _enter_module(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not self._active:
            return
        if module is self.model and not self._stack:  # a new pass of the whole model
            self._watched.clear()
            self._grad_in_range.clear()
        self._stack.append((name, (args, kwargs)))  # references only: checked on failure

    def _leave_module(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if not self._active:
            return
        if self._stack and self._stack[-1][0] == name:
            self._stack.pop()
        caller = self._stack[-1][0] if self._stack else None
        self._clock += 1
        self._finished[name] = self._clock
        if output is None:  # forward raised (always_call) or returned nothing
            return
        outputs = list(floating_tensors(output))
        if self.forward is None and not in_range(outputs, self._limit):
            self.forward = self._forward_event(
                name, outputs, list(floating_tensors((args, kwargs)))
            )
        if self.trace_backward and torch.is_grad_enabled() and self.backward is None:
            for t in outputs:
                self._watch(t, _Role("output", name, caller))
            for t in floating_tensors((args, kwargs)):
                self._watch(t, _Role("input", name))

    def _inputs_in_range(self, inputs: list[torch.Tensor]) -> bool:
        absmax, has_inf, has_nan = tensor_range(inputs)
        return not (has_inf or has_nan or absmax > self._limit)

    def _forward_event(
        self, name: str, outputs: list[torch.Tensor], inputs: list[torch.Tensor]
    ) -> NonFiniteEvent:
        out_max, out_inf, out_nan = tensor_range(outputs)
        in_max, _, _ = tensor_range(inputs)
        in_max_or_none = in_max if inputs else None
        problem = self._problem(out_inf, out_nan)
        if not self._inputs_in_range(inputs):
            # Bad on entry: the innermost running module whose own inputs were fine made it.
            culprit = next(
                (
                    n
                    for n, tree in reversed(self._stack)
                    if self._inputs_in_range(list(floating_tensors(tree)))
                ),
                None,
            )
            if culprit is None:
                outermost = self._stack[0][0] if self._stack else name
                detail = f"the batch given to {_display(outermost)} already holds {problem} values"
                culprit, suggestion = (
                    outermost,
                    (
                        "bad data, not precision: check the data pipeline (no precision rule "
                        "or loss scale can fix a non-finite input)"
                    ),
                )
                cause: Cause = "data"
            else:
                detail = (
                    f"its own code between submodules produced {problem} values that reached "
                    f"{_display(name)}"
                )
                suggestion = f"look at {_display(culprit)}.forward between its submodule calls"
                cause = "precision"
            return NonFiniteEvent(
                "forward",
                culprit,
                self._classes[culprit],
                problem,
                in_max_or_none,
                out_max,
                detail,
                suggestion,
                cause=cause,
            )
        bad_weights = _nonfinite_params(self._modules.get(name))
        if bad_weights:
            return NonFiniteEvent(
                "forward",
                name,
                self._classes[name],
                problem,
                in_max_or_none,
                out_max,
                f"its {' and '.join(bad_weights)} already held non-finite values before this "
                f"forward, so its output is {problem}: bad weights, not precision",
                "no precision rule or loss scale can fix a non-finite weight: reload a good "
                "checkpoint, or find the step that wrote it (a NaN embedding row comes from the "
                "data or an update that was not skipped)",
                cause="weights",
            )
        dtype = outputs[0].dtype
        if out_nan and not out_inf:
            detail = f"output became NaN from finite inputs (abs-max {in_max:.3g})"
            suggestion = (
                "NaN from finite inputs means 0/0, inf-inf, or sqrt/log of a negative inside the "
                f"module; if an intermediate overflowed in 16 bits, run it in fp32 "
                f"(policy rule '{name} -> fp32')"
            )
        elif out_inf or out_nan:
            fmt = resolve_format(dtype) if dtype in (torch.float16, torch.bfloat16) else FP32
            detail = f"output overflowed to {problem} in {fmt} (inputs abs-max {in_max:.3g})"
            suggestion = (
                f"run it in fp32 (policy rule '{name} -> fp32'), or use bf16, whose range "
                f"reaches {BF16.max:.3g}"
                if fmt is not FP32
                else "the values exceed even fp32: check the weights and the learning rate"
            )
        else:
            detail = f"output reached {out_max:.3g} > {self.fmt} max {self._limit:g}"
            suggestion = (
                f"{_display(name)} output reached {out_max:.2g} > {self.fmt} max {self._limit:g}: "
                f"run it in fp32 (policy rule '{name} -> fp32'), or use bf16"
            )
        return NonFiniteEvent(
            "forward",
            name,
            self._classes[name],
            problem,
            in_max_or_none,
            out_max,
            detail,
            suggestion,
        )

    def _problem(self, has_inf: bool, has_nan: bool) -> str:
        if has_inf and has_nan:
            return "inf and nan"
        if has_inf:
            return "inf"
        if has_nan:
            return "nan"
        return f"above {self.fmt} max"

    # -- backward -------------------------------------------------------------------------------

    def _watch(self, t: torch.Tensor, role: _Role) -> None:
        if not t.requires_grad:
            return
        entry = self._watched.get(id(t))
        if entry is not None and entry[0]() is t:
            entry[1].append(role)
            return
        roles = [role]
        handle = t.register_hook(functools.partial(self._on_grad, roles))
        if t.is_leaf:  # a leaf outlives the graph (an input with requires_grad): remove on detach
            self._handles.append(handle)
        self._watched[id(t)] = (weakref.ref(t), roles)

    def _on_grad(self, roles: list[_Role], grad: torch.Tensor) -> None:
        if not self._active or self.backward is not None:
            return
        if in_range([grad], self._limit):
            self._grad_in_range.update(r.module for r in roles if r.kind == "output")
            return
        self.backward = self._backward_event(roles, grad)

    def _backward_event(self, roles: list[_Role], grad: torch.Tensor) -> NonFiniteEvent:
        absmax, has_inf, has_nan = tensor_range([grad])
        problem = self._problem(has_inf, has_nan)
        params = [r for r in roles if r.kind == "param"]
        consumers = sorted(
            (r for r in roles if r.kind == "input"),
            key=lambda r: (r.module in self._grad_in_range, _depth(r.module)),
            reverse=True,
        )
        producers = sorted((r for r in roles if r.kind == "output"), key=lambda r: _depth(r.module))
        fix = "lower the loss scale (see mixprec.diagnostics.underflow_report), or use bf16"
        if params:
            return self._param_event(params, problem, absmax, fix)
        if (consumers and consumers[0].module in self._grad_in_range) or not producers:
            role = consumers[0]
            detail = f"the gradient of its input became {problem} (abs-max {absmax:.3g})"
            if role.module in self._grad_in_range:
                detail += " while the gradient w.r.t. its output was in range"
            return NonFiniteEvent(
                "backward",
                role.module,
                self._classes[role.module],
                problem,
                absmax,
                None,
                detail,
                f"run it in fp32 in the backward too (policy rule '{role.module} -> fp32'), "
                f"or {fix}",
            )
        producer = producers[0]  # the outermost module that returned this tensor
        caller = producer.extra
        if caller is None:
            return NonFiniteEvent(
                "backward",
                producer.module,
                self._classes[producer.module],
                problem,
                None,
                absmax,
                f"the gradient arriving at the model's output was already {problem}: the loss, "
                "or the loss times its scale, overflowed",
                f"compute the loss in fp32 and {fix}",
            )
        return NonFiniteEvent(
            "backward",
            caller,
            self._classes[caller],
            problem,
            None,
            absmax,
            f"the gradient w.r.t. the output of {_display(producer.module)} became {problem} in "
            "the backward of its own code between submodules (a functional op such as an "
            "activation or a residual add)",
            f"run {_display(caller)} in fp32 (policy rule '{caller} -> fp32'), or {fix}",
        )

    def _param_event(
        self, params: list[_Role], problem: str, absmax: float, fix: str
    ) -> NonFiniteEvent:
        # A tied weight has one gradient, the sum of all its uses; the owner that ran last in
        # the forward (an LM head after the embedding) is the first whose backward adds to it.
        role = max(params, key=lambda r: self._finished.get(r.module, 0))
        names = tuple(f"{r.module}.{r.extra}" if r.module else str(r.extra) for r in params)
        detail = (
            f"the gradient of its parameter {role.extra!r} became {problem} (abs-max {absmax:.3g})"
        )
        if len(names) > 1:
            detail += f"; the weight is tied: one tensor shared by {' and '.join(names)}, whose "
            detail += "gradient sums the contributions of every owner"
        elif role.module in self._grad_in_range:
            detail += " while the gradient w.r.t. its output was in range"
        rules = ", ".join(f"'{r.module} -> fp32'" for r in params)
        return NonFiniteEvent(
            "backward",
            role.module,
            self._classes[role.module],
            problem,
            None,
            None,
            detail,
            f"run {'them' if len(params) > 1 else 'it'} in fp32 in the backward too "
            f"(policy rule{'s' if len(params) > 1 else ''} {rules}), or {fix}",
            parameters=names,
        )


def _nonfinite_params(module: nn.Module | None) -> list[str]:
    """The module's own parameters holding inf or NaN, described (rows for a matrix)."""
    if module is None:
        return []
    found = []
    for name, param in module.named_parameters(recurse=False):
        bad = ~torch.isfinite(param.detach())
        if not bool(bad.any()):
            continue
        if bad.dim() > 1:
            rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:3])) + (", ..." if len(rows) > 3 else "")
            found.append(f"parameter {name!r} ({len(rows)} rows: {shown})")
        else:
            found.append(f"parameter {name!r}")
    return found
