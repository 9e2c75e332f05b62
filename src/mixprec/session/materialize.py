"""Materialize a model built on the meta device directly in the formats the policy stores.

Design note: a model built under ``torch.device("meta")`` has shapes and no storage, so a 16-bit
policy never needs the fp32 model at all. :func:`materialize` walks the modules children first
(the order ``Module.apply`` uses, and the order an eager constructor initializes in: a module
builds its children, then initializes its own tensors), gives each module's own tensors real
storage on the device in the dtype they were declared in, runs the module's initializer, and
casts them to their storage format as soon as no one else will write them (once the parent's
initializer ran, since a parent may re-initialize a child's weight, as GPT-2 does). At any time
only the module being initialized, its children and its siblings not yet collected are in fp32:
about one transformer block, not the model.

Same values as eager: drawing the same random numbers in the same order on the same generator
gives the same values, so the walk replays the eager model's initializer calls:

* plain PyTorch: each module's ``reset_parameters()`` (torch's own layers call it from their
  constructors; ``nn.MultiheadAttention``'s ``_reset_parameters`` too). A module with its own
  meta tensors and no initializer is refused before anything changes; give it a
  ``reset_parameters()`` called at the end of its ``__init__``, or pass ``init``.
* Hugging Face ``PreTrainedModel``: the constructors' draws are replayed on scratch tensors
  (thrown away, as eager's ``post_init`` overwrites them), and at each ``PreTrainedModel`` node
  its ``_initialize_weights`` runs over its modules in ``smart_apply`` order, as ``post_init``
  does.
* ``init=fn``: ``fn(module)`` for every module, children first, on its own tensors.

A parameter shared by two modules (tied embeddings) keeps its first owner's values; the later
owner's initializer runs on a scratch tensor, because eagerly it initialized its own tensor
before the tie and its draws still advanced the generator.

Buffers: a buffer built on meta (a causal mask, a rotary table) has no initial value either.
Floating buffers start as NaN, integer ones as their dtype's minimum, and after the module's
initializer any such sentinel left (or a bool buffer not re-registered) is refused naming the
buffer: recreate it in ``reset_parameters`` or ``init``, or build it off meta
(``torch.ones(..., device="cpu")`` in ``__init__``). Parameters an initializer leaves NaN are
refused the same way.

Values equal the eager model's built on the same device with the same seed (CPU eager vs CPU
materialization; CUDA draws from CUDA's generator).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import nn

from mixprec.optim.cast import storage_plan
from mixprec.policy import Policy

__all__ = ["Initializer", "has_meta", "materialize"]

Initializer = Callable[[nn.Module], Any]


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def materialize(
    model: nn.Module,
    policy: Policy,
    device: torch.device | str,
    *,
    init: Initializer | None = None,
) -> None:
    """Give ``model``'s meta tensors storage on ``device``, initialized as eagerly, params cast.

    Parameters keep their identity (``torch.utils.swap_tensors``), so an optimizer built on
    the meta model's parameters keeps working, and tied parameters stay tied.

    Args:
        model: the model, materialized in place; tensors already off meta are left alone.
        policy: gives each parameter its storage format (:func:`~mixprec.optim.cast_module`'s
            rules: per module, FP32 islands included).
        device: where the tensors are created.
        init: ``init(module)`` initializes ``module``'s own parameters and buffers; called for
            every module, children first. Default: see the module's design note.

    Raises:
        ValueError: a module with meta tensors has no initializer, or the policy cannot store
            a parameter (nothing changed then); an initializer left a parameter or buffer
            without a value (found as the walk reaches it: the modules before it are
            materialized, so build the model again after the fix).
        TypeError: ``init`` is not callable.
        ValueError: ``init`` given for a model with no meta tensors.
    """
    if init is not None and not callable(init):
        raise TypeError(f"init must be a callable init(module), got {type(init).__name__} {init!r}")
    if not has_meta(model):
        if init is not None:
            raise ValueError(
                f"init={init!r} initializes a model built on the meta device, but this "
                f"{type(model).__name__} has no meta tensors (it is already initialized); "
                "drop init, or build the model under `with torch.device('meta'):`"
            )
        return
    plan = storage_plan(model, policy, buffers=False)  # raises before anything changes
    targets = {key: dtype for key, (_, _, dtype) in plan.items()}
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    hf = _hf_model_class()
    if init is None and not (hf and isinstance(model, hf)):
        _check_initializers(model, names)
    walk = _Walk(torch.device(device), targets, names)
    with torch.no_grad():
        if init is not None:
            walk.run(model, init, every=True)
        elif hf and isinstance(model, hf):
            _materialize_hf(model, walk, hf)
        else:
            walk.run(model, _default_init, every=False)
        walk.cast_all()


class _Walk:
    """The children-first walk: real storage, initializer, check, cast when the parent is done."""

    def __init__(
        self, device: torch.device, targets: dict[int, torch.dtype], names: dict[int, str]
    ) -> None:
        self.device = device
        self.targets = targets
        self.names = names
        self.made: set[int] = set()  # parameters given storage by this walk
        self.pending: dict[int, nn.Parameter] = {}  # given storage, not cast yet

    def run(self, root: nn.Module, initialize: Initializer, *, every: bool) -> None:
        for module in _children_first(root):
            self.init_module(module, initialize, every=every)

    def init_module(self, module: nn.Module, initialize: Initializer, *, every: bool) -> None:
        """Storage for ``module``'s own meta tensors, its initializer (for every module, or only
        for one with tensors of its own to initialize), the checks, the casts."""
        shared = {
            local: p
            for local, p in module._parameters.items()
            if p is not None and id(p) in self.made
        }
        fresh, placeholders = self._allocate(module)
        if not (every or fresh or placeholders or shared):
            for child in module.children():
                self._cast_subtree(child)
            return
        # A later owner of a shared parameter initializes a scratch copy: its draws advance the
        # generator as eagerly (before the tie), the first owner's values stay.
        for local, p in shared.items():
            module._parameters[local] = _scratch(p, self.device)
        try:
            initialize(module)
        finally:
            module._parameters.update(shared)
        self._check(module, fresh, placeholders)
        for child in module.children():
            self._cast_subtree(child)

    def replay(self, module: nn.Module, initialize: Callable[[nn.Module], Any]) -> None:
        """Run ``initialize`` on scratch copies of ``module``'s own meta parameters, and of those
        it shares with a module already materialized (only the generator advances), then put
        the parameters back."""
        saved = {
            local: p
            for local, p in module._parameters.items()
            if p is not None and (p.is_meta or id(p) in self.made)
        }
        if not saved:
            return
        for local, p in saved.items():
            module._parameters[local] = _scratch(p, self.device)
        try:
            initialize(module)
        finally:
            module._parameters.update(saved)

    def _allocate(self, module: nn.Module) -> tuple[set[int], dict[str, torch.Tensor]]:
        fresh: set[int] = set()
        for p in module._parameters.values():
            if p is None or not p.is_meta:
                continue
            real = _scratch(p, self.device)
            real.__dict__.update(p.__dict__)  # swap_tensors swaps __dict__: keep p's attributes
            torch.utils.swap_tensors(p, real)
            self.made.add(id(p))
            self.pending[id(p)] = p
            fresh.add(id(p))
        placeholders: dict[str, torch.Tensor] = {}
        for local, b in module._buffers.items():
            if b is not None and b.is_meta:
                placeholders[local] = module._buffers[local] = _sentinel(b, self.device)
        return fresh, placeholders

    def _check(
        self, module: nn.Module, fresh: set[int], placeholders: dict[str, torch.Tensor]
    ) -> None:
        where = self.names.get(id(module), "") or "<root>"
        for local, p in module._parameters.items():
            if p is not None and id(p) in fresh and bool(torch.isnan(p).any()):
                raise ValueError(
                    f"{type(module).__name__} {where!r}: its initializer left parameter "
                    f"{local!r} (built on the meta device) without a value; initialize every "
                    "parameter of the module in its reset_parameters(), or pass "
                    "prepare(..., init=fn) with fn(module) doing it"
                )
        for local, placeholder in placeholders.items():
            buffer = module._buffers.get(local)
            if buffer is not None and (buffer.is_meta or _still_sentinel(buffer, placeholder)):
                raise ValueError(
                    f"{type(module).__name__} {where!r}: buffer {local!r} was built on the meta "
                    "device and its module's initializer does not compute it, so it has no "
                    "value. Recompute it in reset_parameters() (self.register_buffer("
                    f"{local!r}, ...)), pass prepare(..., init=fn) with fn(module) doing it, "
                    "or create it off meta in __init__ (device='cpu')"
                )

    def _cast_subtree(self, module: nn.Module) -> None:
        for p in module.parameters():
            if id(p) in self.pending:
                self._cast(self.pending.pop(id(p)))

    def cast_all(self) -> None:
        for p in list(self.pending.values()):
            self._cast(p)
        self.pending.clear()

    def _cast(self, p: nn.Parameter) -> None:
        dtype = self.targets.get(id(p), p.dtype)
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def _scratch(p: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A NaN-filled parameter shaped like ``p`` (NaN marks values no initializer wrote)."""
    tensor = torch.empty(p.shape, dtype=p.dtype, device=device)
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    return nn.Parameter(tensor, requires_grad=p.requires_grad)


def _sentinel(b: torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = torch.empty(b.shape, dtype=b.dtype, device=device)
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif b.dtype != torch.bool:
        tensor.fill_(torch.iinfo(b.dtype).min)
    return tensor


def _still_sentinel(buffer: torch.Tensor, placeholder: torch.Tensor) -> bool:
    """Whether the initializer left (part of) a meta buffer without a value."""
    if buffer.dtype == torch.bool:
        return buffer is placeholder  # no sentinel value: the buffer must be re-registered
    if buffer.is_floating_point() or buffer.is_complex():
        return bool(torch.isnan(buffer).any())
    return bool((buffer == torch.iinfo(buffer.dtype).min).any())


def _children_first(root: nn.Module) -> Iterator[nn.Module]:
    """Every module once, children before their parent (``Module.apply``'s order)."""
    seen: set[int] = set()

    def visit(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            if id(child) not in seen:
                seen.add(id(child))
                yield from visit(child)
        yield module

    seen.add(id(root))
    yield from visit(root)


def _own_initializer(module: nn.Module) -> Callable[[], Any] | None:
    """``reset_parameters``, or torch's own ``_reset_parameters`` (``nn.MultiheadAttention``)."""
    method = getattr(module, "reset_parameters", None)
    if callable(method):
        return method
    if type(module).__module__.startswith("torch.nn."):
        method = getattr(module, "_reset_parameters", None)
        if callable(method):
            return method
    return None


def _own_meta(module: nn.Module) -> bool:
    own = (*module._parameters.values(), *module._buffers.values())
    return any(t is not None and t.is_meta for t in own)


def _default_init(module: nn.Module) -> None:
    method = _own_initializer(module)
    if method is not None:
        method()


def _check_initializers(model: nn.Module, names: dict[int, str]) -> None:
    missing = [
        f"{names.get(id(m), '') or '<root>'} ({type(m).__name__})"
        for m in _children_first(model)
        if _own_meta(m) and _own_initializer(m) is None
    ]
    if missing:
        raise ValueError(
            f"cannot materialize the meta-device model: {missing!r} hold parameters or buffers "
            "on the meta device and have no reset_parameters(), so their initial values are "
            "unknown. Give each such class a reset_parameters() that initializes its own "
            "tensors (and call it at the end of its __init__, so eager and meta builds agree), "
            "or pass prepare(model, ..., init=fn) with fn(module) initializing a module's own "
            "tensors"
        )


# -- Hugging Face ----------------------------------------------------------------------------


def _hf_model_class() -> type | None:
    """``transformers.PreTrainedModel`` when transformers is already imported (never imports
    it: a model of that class implies it is)."""
    module = sys.modules.get("transformers")
    return getattr(module, "PreTrainedModel", None) if module is not None else None


def _hf_constructor_init(module: nn.Module) -> Callable[[], Any] | None:
    """What ``module``'s constructor drew, for the replay: ``reset_parameters``, or the draws
    of transformers' ``Conv1D`` constructor (``normal_(weight, std=0.02)``), which has none."""
    method = _own_initializer(module)
    if method is not None:
        return method
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        # module.weight read at call time: the replay has put a scratch tensor there
        return lambda: nn.init.normal_(cast(torch.Tensor, module.weight), std=0.02)
    return None


def _call(method: Callable[[], Any]) -> Initializer:
    return lambda module: method()


def _materialize_hf(model: nn.Module, walk: _Walk, hf: type) -> None:
    """Replay the eager construction: each module's constructor draws (on scratch), and at the
    end of each ``PreTrainedModel``'s construction its ``post_init`` initialization."""
    unknown: list[str] = []
    for module in _children_first(model):
        if any(
            p is not None and (p.is_meta or id(p) in walk.made) for p in module._parameters.values()
        ):
            method = _hf_constructor_init(module)
            if method is None:
                unknown.append(type(module).__name__)
            else:
                walk.replay(module, _call(method))
        if isinstance(module, hf):
            _hf_post_init(module, walk, hf)
    if unknown:
        warnings.warn(
            f"materialized a Hugging Face model whose modules {sorted(set(unknown))!r} have no "
            "reset_parameters(): whatever random numbers their constructors drew could not be "
            "replayed, so initial values may differ from an eagerly built model's (they are "
            "initialized by the model's _init_weights all the same)",
            stacklevel=4,
        )


def _hf_post_init(owner: nn.Module, walk: _Walk, hf: type) -> None:
    """``owner.initialize_weights()`` module by module: ``smart_apply``'s order and dispatch."""
    try:
        from transformers import initialization as hf_init

        guard: Any = hf_init.guard_torch_init_functions()
    except (ImportError, AttributeError):  # older transformers: no guard
        guard = nullcontext()
    custom = bool(getattr(owner, "is_custom_code", lambda: False)())

    def visit(module: nn.Module, initializer: Any) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, hf) else initializer)
        if not getattr(module, "_is_hf_initialized", False):  # as _initialize_weights skips
            walk.init_module(module, lambda m: initializer(m, custom), every=True)

    with guard:
        visit(owner, owner._initialize_weights)
