"""The forward hooks that make every call of a prepared model run under the session's policy.

Design note: ``prepare`` hooks the model's own forward and the forward of each of its direct
children that holds parameters or buffers, because a model's own code calls its parts directly:
Hugging Face ``generate`` runs ``model.get_encoder()(...)`` on an encoder-decoder, bypassing the
top-level forward. A stateless child (an activation, a pooling, a reshape) is not such a part,
and a hooked module takes torch's slow call path on every forward, so it is left alone. A pre-hook
enters the session's autocast region unless one with the same settings is already open (the
top-level call, or the user's ``with mp.autocast():``), and a forward hook registered with
``always_call=True`` leaves it again — also when ``forward`` raises — and casts the floating
outputs to the policy's ``output`` format. Only the hook that entered the region leaves it and
casts, so the children of a hooked call run exactly as they did before.

The hooks are a small module-level object (:class:`PolicyForward`), not closures: a prepared
model pickles (``torch.save(model)``) and loads with its hooks working. A prepared model carries
its policy's text (:func:`mark_prepared`), so a second ``prepare`` is refused
(:func:`check_unprepared`) instead of stacking a second policy on the first.

Under ``torch.compile``, a hook that finds the region open is traced as a few reads of torch's
autocast state (which dynamo guards on) and adds no graph break. Entering the region is eager
(mixprec's region pushes a configuration that dynamo cannot trace), so a model compiled after
``prepare`` and called outside a region breaks its graph there: call it inside
``with mp.autocast():`` (or compile before ``prepare``) for a whole graph.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.compute.autocast import autocast, current_region
from mixprec.compute.islands import cast_outputs

__all__ = [
    "Clock",
    "PolicyForward",
    "check_unprepared",
    "hook_forward",
    "mark_prepared",
]

_ATTRIBUTE = "_mixprec_forward"  # the PolicyForward a module's hooks belong to
_PREPARED = "_mixprec_policy"  # set on a model prepare changed: the policy's text


class Clock:
    """The loop around a prepared model, as its session and its hooks see it (shared by both).

    Args:
        needs: what a loop that trains the model without the session loses (loss scaling, the
            16-bit update mode), or None when such a loop loses nothing.
    """

    def __init__(self, needs: str | None = None) -> None:
        self.started: float | None = None  # when the current iteration's first forward started
        self.needs = needs
        self.backwards = 0  # losses given to the session's backward
        self.managed = False  # a framework adapter (MixprecTrainer, Lightning) drives the loop
        self._forwards = 0
        self._warned = False

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def training_forward(self, policy: str) -> None:
        """Count a training forward; warn once when the model trains without the session.

        A plain loop (``loss.backward(); optimizer.step()``, or a plain ``transformers.Trainer``)
        runs the forward under the policy but skips what the session adds to the backward and the
        step. Two forwards without any session backward is the sign: the session's loop gives
        its first backward right after its first forward.
        """
        self._forwards += 1
        if self.needs is None or self.backwards or self.managed or self._warned:
            return
        if self._forwards < 3:
            return
        self._warned = True
        warnings.warn(
            f"this model was prepared by mixprec (policy {policy!r}) but is trained without the "
            f"session's backward and step, so it trains without {self.needs}. Train through "
            "mp.backward(loss) and mp.step(optimizer); with Hugging Face use "
            "mixprec.integrations.transformers.MixprecTrainer instead of Trainer (Lightning: "
            "mixprec.integrations.lightning's precision plugin)",
            UserWarning,
            stacklevel=2,
        )


class PolicyForward:
    """A picklable pair of forward hooks running a module's calls under one autocast region.

    Args:
        region_args: the arguments of the session's :class:`~mixprec.compute.autocast` region.
        output_dtype: what the floating outputs of a call that entered the region are cast to.
        policy: the policy's text, to name it in errors.
        clock: started at the first call of an iteration.
    """

    def __init__(
        self, region_args: dict[str, Any], output_dtype: torch.dtype, policy: str, clock: Clock
    ) -> None:
        self.region_args = dict(region_args)
        self.output_dtype = output_dtype
        self.policy = policy
        self.clock = clock
        self._region: autocast | None = None
        self._same: autocast | None = None  # _region, if it has region_args' settings
        self._entered: list[bool] = []  # per call not yet left: did this hook enter the region?

    def __getstate__(self) -> dict[str, Any]:
        # The region holds thread state; a pickled model is never in the middle of a call.
        skip = ("_region", "_same", "_entered")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._region, self._same, self._entered = None, None, []

    def is_open(self) -> bool:
        """Whether a region with this one's settings is the innermost open one."""
        device_type = self.region_args["device_type"]
        if not torch.is_autocast_enabled(device_type):
            return False
        if torch.get_autocast_dtype(device_type) != self.region_args["dtype"]:
            return False
        if torch.compiler.is_compiling():
            # dynamo guards on torch's autocast state, not on mixprec's thread-local region:
            # torch's cache is off in mixprec's regions and on in a plain torch.autocast.
            return not torch.is_autocast_cache_enabled()
        region = current_region()
        # The common case, a part called inside the call whose hook entered the region: the
        # innermost region is the one these hooks enter, whose settings were compared once.
        if region is not None and region is self._same:
            return True
        return _same_region(region, self.region_args)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.is_open():
            self._entered.append(False)
            return
        _enter(self, module.training)
        self._entered.append(True)

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """A child's: leave the region and cast the outputs if its pre-hook entered it."""
        if not self._entered:  # an earlier pre-hook raised before ours ran
            return None
        if not self._entered.pop():
            return None
        _leave(self)
        return cast_outputs(output, self.output_dtype)

    def post_hook_top(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """The model's: leave the region if entered; cast the outputs always (also inside the
        user's ``with mp.autocast():``)."""
        if not self._entered:
            return None
        if self._entered.pop():
            _leave(self)
        return cast_outputs(output, self.output_dtype)


@torch._dynamo.disable  # region entry is eager (torch.compile sees its autocast state)
def _enter(hooks: PolicyForward, training: bool) -> None:
    hooks.clock.start()
    if training and torch.is_grad_enabled():
        hooks.clock.training_forward(hooks.policy)
    if hooks._region is None:
        hooks._region = autocast(**hooks.region_args)
        hooks._same = hooks._region if _same_region(hooks._region, hooks.region_args) else None
    hooks._region.__enter__()


@torch._dynamo.disable
def _leave(hooks: PolicyForward) -> None:
    assert hooks._region is not None  # entered by _enter
    hooks._region.__exit__(None, None, None)


def _same_region(region: autocast | None, args: dict[str, Any]) -> bool:
    if region is None:
        return False
    mine = (args["device_type"], args["dtype"], args["enabled"], args["backend"])
    theirs = (region.device_type, region.dtype, region.enabled, region.backend)
    return mine == theirs and region.target == region.device_type


def mark_prepared(model: nn.Module, policy: str) -> None:
    """Record on ``model`` (a plain attribute: it pickles and deep-copies along) that a session
    prepared it under ``policy``."""
    model.__dict__[_PREPARED] = policy


def check_unprepared(model: nn.Module) -> None:
    """Refuse a model that a session already prepared (or one holding such a model).

    A second ``prepare`` would stack a second set of hooks on the first, and the first policy's
    compute format would silently stay in force, with parameters already cast by the first.

    Raises:
        RuntimeError: naming the first policy and the fix.
    """
    for name, module in model.named_modules():
        policy = module.__dict__.get(_PREPARED)
        if policy is None:
            continue
        where = f"its submodule {name!r}" if name else "it"
        raise RuntimeError(
            f"this {type(model).__name__} was already prepared: a MixedPrecision session prepared "
            f"{where} with policy {policy!r} (its parameters are cast and its forward runs under "
            "that policy), and preparing it again would stack a second policy on the first. "
            "Keep using the first session, or prepare a fresh model (build it again, or "
            "copy.deepcopy(model) before the first prepare)"
        )


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def hook_forward(model: nn.Module, hooks: PolicyForward) -> list[RemovableHandle]:
    """Hook ``model`` and each of its direct children that holds parameters or buffers with
    ``hooks`` (see the module note).

    The pre-hook is prepended so the region is open before any other hook runs (the FP32
    islands' hooks read its state).
    """
    handles = []
    for module in (model, *filter(_holds_state, model.children())):
        post_hook = hooks.post_hook_top if module is model else hooks.post_hook
        handles.append(module.register_forward_pre_hook(hooks.pre_hook, prepend=True))
        handles.append(module.register_forward_hook(post_hook, always_call=True))
        module.__dict__[_ATTRIBUTE] = hooks
    return handles
