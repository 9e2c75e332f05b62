"""The machinery the optimizer wrappers share: a torch Optimizer in front of another one.

Every wrapper here shows its users the model's own (16-bit) parameters in ``param_groups`` and keeps
a *shadow* tensor per parameter that the wrapped ("inner") optimizer actually steps: an fp32 master,
or an fp32 scratch copy that lives only during ``step``. Hyperparameters are copied from the outer
groups to the inner ones at every step, so a learning-rate scheduler built on the wrapper drives
the inner optimizer. Parameters that are already fp32 are their own shadow (the wrapper is the
identity for them), and so are complex ones: like torch's autocast, the wrappers leave non-real
tensors as they are, and the inner optimizer steps them directly. Loss scaling uses torch's own
protocol: the class sets ``_step_supports_amp_scaling``, so ``GradScaler.step`` sets
``grad_scale`` and ``found_inf`` on the wrapper; the unscale is folded into the gradient copy
and an overflow skips the whole step.

A closure is handed on to the inner optimizer wrapped in one that first writes the shadows the
inner optimizer is trying into the model (rounded to nearest), then evaluates the user's closure
and copies its gradients into the shadows, so optimizers that evaluate several trial points per
step (LBFGS) see the model at each of them. The step's final weights are rounded by the
wrapper's own rule. Param groups added to the inner optimizer after wrapping are taken on at the
next step (or ``zero_grad``, ``state_dict``...), as if added through the wrapper.

Chunks (CPU): without a closure the parameters are stepped in chunks of ``chunk_numel``
elements, one call of the inner optimizer per chunk, with the other shadows' gradients absent so
that it skips them. The fp32 scratch of a chunk is a few MiB kept between steps (a fixed
workspace, like the cache of a GPU allocator): reused, it costs no page faults, and it is still in
cache when the inner optimizer reads it. For the torch optimizers whose update of a parameter
reads nothing but that parameter (``SEPARABLE_OPTIMIZERS``: SGD, Adam, AdamW, RMSprop...) the
bits are those of one call. Every other case takes the one-call path: another optimizer class
(subclasses included, which may couple parameters), step hooks on the inner optimizer or global
ones (they would run once per chunk), ``max_grad_norm`` (a norm over all gradients), parameters
off the CPU, and a closure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from mixprec.optim._shards import is_dtensor, local, local_numel
from mixprec.optim.fused import FusedOption, order_states, refusal
from mixprec.scaling.clip import global_norm

__all__: list[str] = []

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# The torch optimizers whose update of a parameter reads only that parameter's gradient and state,
# so that stepping the parameters in several calls gives the bits of one call. Exact types only: a
# subclass may couple its parameters (a global norm, a shared statistic).
SEPARABLE_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.ASGD,
        torch.optim.Adadelta,
        torch.optim.Adafactor,
        torch.optim.Adagrad,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Rprop,
        torch.optim.SGD,
    }
)
# On CPUs the fp32 scratch of one chunk (a few MiB) stays in cache and in the allocator's heap;
# GPU caching allocators keep a whole-model buffer and prefer few, large kernel launches.
CPU_CHUNK_NUMEL = 1 << 21
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_NAMES = "float16, bfloat16, float32 and complex"


def inverse_scale(grad_scale: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """``1 / grad_scale`` computed as torch.amp.GradScaler does (reciprocal in fp64, then fp32)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale.double().reciprocal().float()
    return float(1.0 / grad_scale)


def check_saved_buffers(
    saved: object,
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]],
    what: str,
    dtype_of: Callable[[torch.Tensor], torch.dtype],
    saver: str,
) -> None:
    """Check a saved list of per-parameter buffers against ``pairs`` of (parameter, own buffer).

    Where this wrapper keeps a buffer for a parameter the saved entry must be a tensor of
    ``dtype_of(parameter)``; where it keeps none (an fp32 parameter) the entry must be None.

    Raises:
        ValueError: a missing or mis-sized list, a 16-bit/fp32 mismatch, a wrong dtype.
    """
    if not isinstance(saved, list) or len(saved) != len(pairs):
        raise ValueError(
            f"state dict has no list of {len(pairs)} {what}s (got {type(saved).__name__}); "
            f"save it with {saver}.state_dict()"
        )
    for index, (buffer, (param, own)) in enumerate(zip(saved, pairs, strict=True)):
        if (buffer is None) != (own is None):
            raise ValueError(
                f"parameter {index} is {param.dtype} here but was "
                f"{'float32 or complex' if buffer is None else 'a 16-bit parameter'} when saved; "
                "cast the model by the same policy before loading"
            )
        if buffer is not None and (
            not isinstance(buffer, torch.Tensor) or buffer.dtype != dtype_of(param)
        ):
            raise ValueError(
                f"{what} {index} in the state dict is not a {dtype_of(param)} tensor: "
                f"{type(buffer).__name__}"
            )


class Scratch:
    """Reusable flat buffers for a step's scratch tensors, one per purpose, dtype and device.

    On CPUs a fresh multi-MiB tensor costs a page fault per 4 KiB at every step (glibc hands
    freed ``mmap`` chunks straight back to the kernel), which can cost more than the arithmetic.
    A buffer of at most ``limit`` elements is therefore kept and handed out again (as a view of
    its first elements); larger requests, and every request on other devices (whose caching
    allocators already reuse memory), get a fresh tensor freed after use. So what is kept is
    bounded by ``limit`` per purpose, whatever the model's size.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(
        self, name: str, numel: int, dtype: torch.dtype, device: torch.device, limit: int | None
    ) -> torch.Tensor:
        """A flat tensor of ``numel`` elements, uninitialised; valid until the next ``take``
        of the same ``name``."""
        if device.type != "cpu" or limit is None or numel > limit:
            return torch.empty(numel, dtype=dtype, device=device)
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]

    def like(self, name: str, tensors: list[torch.Tensor], limit: int | None) -> list[torch.Tensor]:
        """Uninitialised contiguous fp32 tensors shaped like ``tensors``, carved from one buffer."""
        if not tensors:
            return []
        device = tensors[0].device
        if any(t.device != device for t in tensors):
            return [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
        sizes = [t.numel() for t in tensors]
        flat = self.take(name, sum(sizes), torch.float32, device, limit)
        return [piece.view(t.shape) for piece, t in zip(flat.split(sizes), tensors, strict=True)]

    def tensors(self) -> list[torch.Tensor]:
        """The buffers kept (for memory accounting)."""
        return list(self._buffers.values())


def _clip_sharded_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip ``grads`` (some of them DTensors) to the global ``max_norm`` as ``clip_grad_norm_``
    does, scaling the local shards; returns the global norm (a plain tensor, the same on every
    rank of the meshes)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norm = global_norm(groups, 2.0, grads[0].device)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([local(g) for g in grads], coefficient)
    return norm


def hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's settings without its ``params`` list."""
    return {k: v for k, v in group.items() if k != "params"}


class _StateView(Mapping[torch.Tensor, Any]):
    """``wrapper.state[param]``: the inner optimizer's state of that parameter's shadow."""

    def __init__(self, wrapper: WrappedOptimizer) -> None:
        self._wrapper = wrapper

    def __getitem__(self, param: torch.Tensor) -> Any:
        shadow = self._wrapper._shadows[param]
        return self._wrapper.optimizer.state[shadow]

    def __iter__(self) -> Iterator[torch.Tensor]:
        inner_state = self._wrapper.optimizer.state
        return (p for p, s in self._wrapper._shadows.items() if s in inner_state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class WrappedOptimizer(FusedOption, torch.optim.Optimizer):
    """Base class: owns the inner optimizer, the outer param groups and the step skeleton.

    Subclasses define :meth:`_make_shadow`, :meth:`_load_weights`, :meth:`_copy_grads` and
    :meth:`_after_inner_step`, and extend the state dict with :meth:`_extra_state`,
    :meth:`_check_extra_state` and :meth:`_load_extra_state`.

    Attributes:
        chunk_numel: the most 16-bit elements one call of the inner optimizer steps on CPUs
            (default ``CPU_CHUNK_NUMEL``, 2**21); None steps everything in one call. Results do
            not depend on it (see the module's note on chunks); the kept workspace does.
        fused: ``"auto"`` (default) updates the parameters of SGD, Adam and AdamW in one pass per
            parameter (:mod:`mixprec.optim.fused`, which lists when it applies); ``"off"``
            always steps through the inner optimizer. ``last_step_fused`` counts the parameters
            the last step updated in one pass.
    """

    # torch.amp.GradScaler.step hands such optimizers `grad_scale` and `found_inf` attributes.
    _step_supports_amp_scaling = True
    _kind = "wrapped"

    def __init__(
        self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None
    ) -> None:
        name = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{name} wraps a torch.optim.Optimizer, got {type(optimizer).__name__} "
                f"{optimizer!r}; build the optimizer first, e.g. "
                f"{name}(torch.optim.AdamW(model.parameters(), lr=1e-3))"
            )
        if isinstance(optimizer, WrappedOptimizer):
            raise TypeError(
                f"{name} got an optimizer that is already wrapped ({type(optimizer).__name__}); "
                "wrap the plain torch optimizer once"
            )
        if len(optimizer.state) > 0:
            raise RuntimeError(
                f"{name} must wrap the optimizer before its first step, but "
                f"{type(optimizer).__name__} already holds state for {len(optimizer.state)} "
                "parameters; create the wrapper right after the optimizer"
            )
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(
                    f"max_grad_norm must be a number or None, got {type(max_grad_norm).__name__} "
                    f"{max_grad_norm!r}"
                )
            if not max_grad_norm > 0:
                raise ValueError(
                    f"max_grad_norm must be positive (or None for no clipping), "
                    f"got {max_grad_norm!r}"
                )
        for group in optimizer.param_groups:
            self._check_group(group["params"])
        self.optimizer = optimizer
        self._chunk_numel: int | None = CPU_CHUNK_NUMEL
        self._scratch = Scratch()
        self._active_limit: int | None = None
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.last_step_skipped = False
        self.last_grad_norm: torch.Tensor | None = None
        self._shadows: dict[torch.Tensor, torch.Tensor] = {}
        self._adopting = True  # super().__init__ calls add_param_group for the existing groups
        outer = [
            {**hyperparameters(g), "params": list(g["params"])} for g in optimizer.param_groups
        ]
        super().__init__(outer, optimizer.defaults)
        self._adopting = False
        for outer_group, inner_group in zip(self.param_groups, optimizer.param_groups, strict=True):
            # In place: some optimizers keep the list itself (LBFGS's `_params`).
            inner_group["params"][:] = [self._adopt(p) for p in outer_group["params"]]
        self.state = _StateView(self)  # type: ignore[assignment]
        if not any(p.dtype in SIXTEEN_BIT for p in self._params()):
            warnings.warn(
                f"{type(self).__name__}: every parameter is already float32 (or complex, which is "
                "left as it is), so the wrapper is the identity (no copies, same steps as the "
                "plain optimizer); cast the model to 16 bits first (mixprec.optim.cast_module) "
                "or drop the wrapper",
                stacklevel=3,
            )

    @property
    def chunk_numel(self) -> int | None:
        """The most 16-bit elements one call of the inner optimizer steps on CPUs (None: all)."""
        return self._chunk_numel

    @chunk_numel.setter
    def chunk_numel(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(
                f"chunk_numel must be a positive int or None, got {type(value).__name__} {value!r}"
            )
        if value is not None and value < 1:
            raise ValueError(
                f"chunk_numel must be a positive int (elements per chunk) or None (one call for "
                f"all parameters), got {value!r}"
            )
        self._chunk_numel = value

    # -- parameters ---------------------------------------------------------------------------

    def _check_group(self, params: list[torch.Tensor]) -> None:
        name = type(self).__name__
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"{name}: one param group mixes devices {sorted(map(str, devices))!r}, which is "
                "not supported; put the parameters of each device in their own group or optimizer"
            )
        for p in params:
            if p.dtype not in _SUPPORTED_DTYPES and not p.is_complex():
                raise TypeError(
                    f"{name} handles {_SUPPORTED_NAMES} parameters, got one of dtype "
                    f"{p.dtype!r} and shape {tuple(p.shape)!r}; cast the model by policy first "
                    "(mixprec.optim.cast_module)"
                )

    def _adopt(self, param: torch.Tensor) -> torch.Tensor:
        shadow = self._make_shadow(param) if param.dtype in SIXTEEN_BIT else param
        self._shadows[param] = shadow
        return shadow

    def _make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of model parameters, as ``torch.optim.Optimizer.add_param_group`` does.

        The inner optimizer gets a matching group over the new parameters' shadows, with the same
        settings (missing ones are filled from the inner optimizer's defaults).
        """
        if self._adopting:
            super().add_param_group(param_group)
            return
        self._adopt_inner_groups()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group["params"])
            shadows = [self._adopt(p) for p in group["params"]]
            self.optimizer.add_param_group({**hyperparameters(group), "params": shadows})
        except Exception:
            self.param_groups.pop()
            for p in group["params"]:
                self._shadows.pop(p, None)
            raise

    def _adopt_inner_groups(self) -> None:
        """Take on the param groups added to the inner optimizer since it was wrapped.

        Their parameters are the model's, so they get shadows in the inner group (in place) and a
        matching outer group with the same settings, as :meth:`add_param_group` would have made.

        Raises:
            ValueError: the inner optimizer lost groups, or a new group holds a parameter this
                wrapper already steps (that group is removed from the inner optimizer again).
            TypeError: a new group holds a parameter of an unsupported dtype (removed again).
        """
        inner_groups = self.optimizer.param_groups
        if len(inner_groups) < len(self.param_groups):
            raise ValueError(
                f"the inner {type(self.optimizer).__name__} has {len(inner_groups)} param groups "
                f"but {type(self).__name__} {len(self.param_groups)}; remove nothing from the "
                "inner optimizer after wrapping it"
            )
        while len(inner_groups) > len(self.param_groups):
            group = inner_groups[len(self.param_groups)]
            params = list(group["params"])
            try:
                if any(p in self._shadows for p in params):
                    raise ValueError(
                        f"a param group added to the inner {type(self.optimizer).__name__} holds "
                        f"parameters that {type(self).__name__} already steps; the group was "
                        "removed again: give each parameter to one group only"
                    )
                self._check_group(params)
            except (TypeError, ValueError):
                inner_groups.pop(len(self.param_groups))
                raise
            self.param_groups.append({**hyperparameters(group), "params": params})
            group["params"][:] = [self._adopt(p) for p in params]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _with_grads(self) -> list[torch.Tensor]:
        params = [p for p in self._params() if p.grad is not None]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients (got one for a "
                    f"parameter of shape {tuple(p.shape)!r}); use a dense embedding gradient"
                )
        return params

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the model parameters' gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        Raises:
            TypeError: ``set_to_none`` is not a bool.
        """
        if not isinstance(set_to_none, bool):
            raise TypeError(
                f"set_to_none must be True or False, got {type(set_to_none).__name__} "
                f"{set_to_none!r}"
            )
        self._adopt_inner_groups()
        super().zero_grad(set_to_none)

    def _sync_hyperparameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer on the shadows and write the result into the parameters.

        With a ``GradScaler``, ``scaler.step(optimizer)`` sets ``grad_scale`` (gradients are divided
        by it while they are copied) and ``found_inf`` (non-zero: the step is skipped and nothing
        changes; ``last_step_skipped`` says so).

        With a ``closure`` the inner optimizer gets one too, and may call it as often as it likes
        (LBFGS does, at each trial point): every call first writes the point the inner optimizer
        is trying into the model's parameters (rounded to nearest), then evaluates ``closure``
        and copies the gradients into the shadows. The step's final weights are rounded by this
        wrapper's rule. If ``closure`` raises, the parameters stay at the last point it was
        evaluated at, as a plain torch optimizer leaves them.

        Args:
            closure: re-evaluates the model and returns the loss, as for torch optimizers.

        Returns:
            What the inner optimizer's step returns (the closure's loss), or None.
        """
        self._adopt_inner_groups()
        # torch.amp.GradScaler's protocol: attributes set just for this call, absent otherwise.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            self.last_step_skipped = True
            if closure is None:
                return None
            with torch.enable_grad():
                return closure()
        self.last_step_skipped = False
        self._sync_hyperparameters()
        inv_scale = inverse_scale(getattr(self, "grad_scale", None))
        if closure is None:
            self._step_in_chunks(self._with_grads(), inv_scale)
            self._after_step()
            return None
        loaded = self._params()  # a closure may give any parameter a gradient
        self._load_weights(loaded)

        def evaluate() -> Any:  # the inner optimizer may call it with grad mode on
            with torch.no_grad():
                self._write_trial_point(loaded)
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                for p in loaded:
                    if self._shadows[p] is not p:
                        self._shadows[p].grad = None  # a gradient from an earlier call is stale
                self._load_grads(self._with_grads(), inv_scale)
            return loss

        stepped: list[torch.Tensor] = []
        try:
            loss = self.optimizer.step(evaluate)
            stepped = self._with_grads()
        finally:
            self._after_inner_step(stepped, loaded)
        self._after_step()
        return loss

    def _after_step(self) -> None:
        """Called once after every step that was not skipped (and did not raise)."""

    def _step_in_chunks(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Step ``params`` (all with gradients) in chunks of at most ``chunk_numel`` elements.

        Each chunk is widened, stepped by one call of the inner optimizer (the other parameters'
        shadows hold no gradient then, so it skips them) and rounded back before the next one is
        widened, so the fp32 scratch is one chunk's, reused from step to step by the allocator
        and warm in cache when the inner optimizer reads it again. The results are those of one
        call over everything, bit for bit, for the optimizers whose update of a parameter reads
        only that parameter (:data:`SEPARABLE_OPTIMIZERS`); any other optimizer, clipping by
        ``max_grad_norm`` (a norm over all gradients) and non-CPU parameters get one chunk.
        """
        self._active_limit = self._chunk_limit(params)
        self.last_step_fused = 0
        try:
            chunks = self._chunks(params, self._active_limit)
            if len(chunks) <= 1:
                self._step_chunk(params, inv_scale)
                return
            # fp32 parameters are their own shadows: hide their gradients outside their chunk.
            hidden = {p: p.grad for p in params if self._shadows[p] is p}
            try:
                for p in hidden:
                    p.grad = None
                for chunk in chunks:
                    own = [p for p in chunk if p in hidden]
                    for p in own:
                        p.grad = hidden[p]
                    self._step_chunk(chunk, inv_scale)
                    for p in own:
                        p.grad = None
            finally:
                for p, grad in hidden.items():
                    p.grad = grad
        finally:
            self._active_limit = None

    def _step_chunk(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        states = len(self.optimizer.state)
        if refusal(self.optimizer, self.fused, self.max_grad_norm is not None) is None:
            count = len(params)
            params = self._step_fused(params, inv_scale)
            self.last_step_fused += count - len(params)
        if params:
            self._load_weights(params)
            self._load_grads(params, inv_scale)
            self.optimizer.step()
            self._after_inner_step(params, params)
        if self.last_step_fused and len(self.optimizer.state) != states:
            order_states(self.optimizer)  # new states in parameter order, as one inner step makes

    def _step_fused(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> list[torch.Tensor]:
        """Update what :func:`mixprec.optim.fused.step_fused` can in one pass; return the rest
        (here: all of them)."""
        return params

    def _chunk_limit(self, params: list[torch.Tensor]) -> int | None:
        """``chunk_numel`` where this step may be cut into chunks, else None (one call)."""
        inner = self.optimizer
        if (
            self.max_grad_norm is not None
            or type(inner) not in SEPARABLE_OPTIMIZERS
            or inner._optimizer_step_pre_hooks  # hooks would run once per chunk
            or inner._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or any(p.device.type != "cpu" for p in params)
        ):
            return None
        return self.chunk_numel

    def _scratch_limit(self) -> int | None:
        """The largest scratch buffer to keep between steps: the chunk size while chunking."""
        return self._active_limit

    @staticmethod
    def _chunks(params: list[torch.Tensor], limit: int | None) -> list[list[torch.Tensor]]:
        """``params`` cut, in order, into runs of at most ``limit`` 16-bit elements (a larger
        parameter is a run of its own)."""
        if limit is None:
            return [params]
        chunks: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []
        size = 0
        for p in params:
            numel = local_numel(p) if p.dtype in SIXTEEN_BIT else 0
            if current and size + numel > limit:
                chunks.append(current)
                current, size = [], 0
            current.append(p)
            size += numel
        if current:
            chunks.append(current)
        return chunks

    def _load_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Give the shadows of ``params`` their (unscaled, clipped) fp32 gradients."""
        self._copy_grads(params, inv_scale)
        if self.max_grad_norm is not None:
            shadows = [self._shadows[p] for p in params]
            grads = [s.grad for s in shadows if s.grad is not None]
            if any(is_dtensor(g) for g in grads):
                self.last_grad_norm = _clip_sharded_(grads, self.max_grad_norm)
            else:
                self.last_grad_norm = nn.utils.clip_grad_norm_(
                    shadows, self.max_grad_norm, foreach=True
                )

    def _write_trial_point(self, params: list[torch.Tensor]) -> None:
        """Round the shadows of ``params`` to nearest into them: the point a closure sees."""
        own = [p for p in params if self._shadows[p] is not p]
        if own:
            torch._foreach_copy_([local(p) for p in own], [local(self._shadows[p]) for p in own])

    def _load_weights(self, params: list[torch.Tensor]) -> None:
        """Make the shadows of ``params`` hold the weights the inner optimizer is to step."""
        raise NotImplementedError

    def _copy_grads(
        self, params: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        """Copy the gradients of ``params`` (all present) into their shadows, unscaled."""
        raise NotImplementedError

    def _after_inner_step(self, stepped: list[torch.Tensor], loaded: list[torch.Tensor]) -> None:
        """Write the shadows of ``stepped`` into them; free what the step held for ``loaded``.

        ``stepped`` is a subset of ``loaded`` (the parameters given to :meth:`_load_weights`), and
        empty when the inner step raised.
        """
        raise NotImplementedError

    @staticmethod
    def _unscale_in_place(
        grads: list[torch.Tensor], inv_scale: torch.Tensor | float | None
    ) -> None:
        if grads and inv_scale is not None:
            torch._foreach_mul_([local(g) for g in grads], inv_scale)

    # -- state dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus what this wrapper adds (masters, buffers...).

        Everything in it is a tensor, number, string, list or dict, so it saves with
        ``torch.save`` and loads with ``torch.load(weights_only=True)``.
        """
        self._adopt_inner_groups()
        self._sync_hyperparameters()
        return {
            "wrapper": self._kind,
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "optimizer": self.optimizer.state_dict(),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a state dict from :meth:`state_dict`; all is checked before anything loads.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: it comes from another kind of wrapper or a model of another shape, or is
                missing entries.
        """
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{name}.load_state_dict expects a dict from {name}.state_dict(), got "
                f"{type(state_dict).__name__} {state_dict!r}"
            )
        state_dict = import_plain(state_dict)
        missing = [k for k in ("wrapper", "shapes", "optimizer") if k not in state_dict]
        if missing:
            raise ValueError(
                f"not a {name} state dict: missing {missing!r} (keys present: "
                f"{sorted(state_dict)!r}); save it with {name}.state_dict()"
            )
        if state_dict["wrapper"] != self._kind:
            raise ValueError(
                f"state dict was saved by a {state_dict['wrapper']!r} wrapper, this is "
                f"{self._kind!r}; load it into the same kind of wrapper"
            )
        self._adopt_inner_groups()
        self._check_shapes(state_dict["shapes"])
        self._check_extra_state(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            outer.update(hyperparameters(inner))
        self._load_extra_state(state_dict)

    def _check_shapes(self, shapes: list[list[list[int]]]) -> None:
        here = [[list(p.shape) for p in g["params"]] for g in self.param_groups]
        if [len(g) for g in shapes] != [len(g) for g in here]:
            raise ValueError(
                f"state dict has param groups of sizes {[len(g) for g in shapes]!r}, this "
                f"optimizer {[len(g) for g in here]!r}; it comes from a different model or "
                "grouping, nothing was loaded"
            )
        for group_index, (saved_group, group) in enumerate(zip(shapes, here, strict=True)):
            for index, (saved, shape) in enumerate(zip(saved_group, group, strict=True)):
                if list(saved) != shape:
                    raise ValueError(
                        f"parameter {index} of group {group_index} has shape {tuple(saved)!r} in "
                        f"the state dict but {tuple(shape)!r} here; the state dict comes from a "
                        "different model, nothing was loaded"
                    )

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        pass

    def _load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        pass

    # -- memory accounting (used by mixprec.optim.memory) ----------------------------------------

    def _tensors_by_part(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this wrapper owns, by part: ``master``, ``optimizer_state``,
        ``compensation``, ``grads`` (shadow gradients that are alive), ``workspace`` (kept
        scratch buffers)."""
        self._adopt_inner_groups()
        state = [
            t
            for s in self.optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        ]
        own = [s for p, s in self._shadows.items() if s is not p]
        return {
            "master": [s for s in own if s.numel() > 0],
            "grads": [s.grad for s in own if s.grad is not None],
            "optimizer_state": state,
            "compensation": [],
            "workspace": self._scratch.tensors(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


EXPORT_KEY = "mixprec_wrapper"
"""Where :func:`export_plain` keeps a wrapper's own state beside the inner optimizer's."""


def export_plain(state: Mapping[str, Any]) -> dict[str, Any]:
    """A wrapper's :meth:`~WrappedOptimizer.state_dict` laid out as a plain torch optimizer's.

    The inner optimizer's ``state`` and ``param_groups`` at the top, so a plain optimizer (a
    plain ``transformers.Trainer`` resuming a mixprec checkpoint) loads them and ignores the
    rest; the wrapper's own entries under :data:`EXPORT_KEY`, so a wrapper's ``load_state_dict``
    takes it back whole (:func:`import_plain`). A state without a wrapper passes unchanged.
    """
    if "optimizer" not in state or "wrapper" not in state:
        return dict(state)
    own = {key: value for key, value in state.items() if key != "optimizer"}
    return {**state["optimizer"], EXPORT_KEY: own}


def import_plain(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The wrapper state dict :func:`export_plain` was given; other states unchanged."""
    own = state.get(EXPORT_KEY)
    if not isinstance(own, Mapping) or "optimizer" in state:
        return state
    return {**own, "optimizer": {k: v for k, v in state.items() if k != EXPORT_KEY}}
