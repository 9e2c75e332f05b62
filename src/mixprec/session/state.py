"""The session's state: ``state_dict``/``load_state_dict`` and the ``save``/``load`` checkpoints.

Design note: a checkpoint must resume bit for bit and a refused one must change nothing, so every
load checks all of what it read — checksums, the model's entries, the optimizer states, the
session and scaler state, the RNG state — before it loads any of it. One file per checkpoint
(:func:`mixprec.checkpoint.save_checkpoint`: temp file, fsync, atomic rename) in one process;
under a process group a sharded, re-shardable folder (:mod:`mixprec.distributed.checkpoint`).
The session's own part is small: its policy and update mode (checked on load), the step count
and the loss scaler. :class:`SessionCheckpoint` is a collaborator of
:class:`~mixprec.MixedPrecision`: it is given the policy, update mode and scaler it checks and
loads, and each call is given what changes (the step count, the model, the optimizers), so it
holds no copy of the session's state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mixprec.compute.fp8_state import check_fp8_state, fp8_state, load_fp8_state
from mixprec.policy import Policy
from mixprec.scaling import GradScaler, parse_state_dict
from mixprec.session.setup import distributed, needs_loss_scaling
from mixprec.session.state_checks import (
    check_model_state,
    check_optimizer_states,
    check_rng_state,
    load_optimizers,
)

__all__ = ["STATE_VERSION", "SessionCheckpoint"]

STATE_VERSION = 1


class SessionCheckpoint:
    """The session's state dict and its checkpoint files, for :class:`~mixprec.MixedPrecision`.

    Args:
        policy: the session's policy (a state of another policy is refused or, with
            ``strict=False``, accepted where the stored formats are the same).
        update: the session's update mode (a state of another mode is refused).
        scaler: the session's loss scaler, whose state is checked and loaded.
    """

    def __init__(self, policy: Policy, update: str, scaler: GradScaler) -> None:
        self.policy = policy
        self.update = update
        self.scaler = scaler

    def state_dict(
        self, steps: int, model: nn.Module | None, optimizers: tuple[torch.optim.Optimizer, ...]
    ) -> dict[str, Any]:
        """The session's own state with the state of its ``optimizers``."""
        return {
            **self.session_state(steps, model),
            "optimizers": [opt.state_dict() for opt in optimizers],
        }

    def session_state(self, steps: int, model: nn.Module | None) -> dict[str, Any]:
        """The session's own part: version, policy, update mode, step count, scaler, and the
        FP8 amax histories of ``model`` under delayed scaling."""
        state = {
            "version": STATE_VERSION,
            "policy": str(self.policy),
            "update": self.update,
            "steps": steps,
            "scaler": self.scaler.state_dict(),
        }
        fp8 = fp8_state(model) if model is not None else {}
        if fp8:  # delayed FP8 scaling: the amax histories (not in the model's state_dict)
            state["fp8"] = fp8
        return state

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        model: nn.Module | None,
        optimizers: tuple[torch.optim.Optimizer, ...],
    ) -> int:
        """Load :meth:`state_dict` after checking all of it; returns its step count."""
        self.check(state, model, len(optimizers))
        optimizer_states = state.get("optimizers")
        if optimizer_states is not None:  # absent in checkpoints, which store them beside
            check_optimizer_states(optimizers, optimizer_states)
            load_optimizers(optimizers, optimizer_states)
        return self.load_session_state(state, model)

    def check(
        self, state: object, model: nn.Module | None, n_optimizers: int, strict: bool = True
    ) -> bool:
        """Raise ValueError unless ``state`` is a session state this session can load.

        Returns whether its loss-scaler state is loaded: with ``strict=False`` a state of
        another policy is accepted (the caller checks the weights' formats), and its scaler
        state is loaded only where this session's scaler takes it (fp16 -> fp16 policies); a
        session that scales where the saved one did not starts from its initial scale.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a MixedPrecision state (version {STATE_VERSION} expected), got keys "
                f"{sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__}"
            )
        missing = [key for key in ("policy", "update", "steps", "scaler") if key not in state]
        if missing:
            raise ValueError(
                f"the MixedPrecision state lacks {missing!r} (keys present: "
                f"{sorted(map(str, state))!r}); save it with MixedPrecision.state_dict()"
            )
        try:
            same_policy = Policy.parse(state["policy"]) == self.policy
        except (TypeError, ValueError):
            same_policy = False
        if (strict and not same_policy) or state["update"] != self.update:
            raise ValueError(
                f"the state was saved with policy {state['policy']!r} and update "
                f"{state['update']!r}; this session uses {str(self.policy)!r} and {self.update!r}"
                + (
                    ""
                    if state["update"] != self.update
                    else "; pass strict=False to load it where the weights' stored formats are "
                    "the same (e.g. bf16-mixed and fp16-mixed both keep fp32 weights)"
                )
            )
        steps = state["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"the state's step count must be an int >= 0, got {steps!r}")
        optimizer_states = state.get("optimizers")
        if optimizer_states is not None and (
            not isinstance(optimizer_states, list) or len(optimizer_states) != n_optimizers
        ):
            count = len(optimizer_states) if isinstance(optimizer_states, list) else "no list of"
            raise ValueError(
                f"the state holds {count} optimizer states; this session prepared "
                f"{n_optimizers} optimizers"
            )
        if model is not None and "fp8" in state:
            check_fp8_state(model, state["fp8"])
        if not same_policy and needs_loss_scaling(Policy.parse(state["policy"])) != (
            needs_loss_scaling(self.policy)
        ):
            return False  # one of the two runs scales and the other does not: nothing to carry
        if self.scaler.is_enabled():
            try:  # the scaler's own check, run without loading
                parse_state_dict(state["scaler"], self.scaler.rule, self.scaler.strategy)
            except (TypeError, ValueError) as err:
                raise ValueError(f"the state's loss scaler state is refused: {err}") from None
        return True

    def load_session_state(
        self, state: Mapping[str, Any], model: nn.Module | None, scaler: bool = True
    ) -> int:
        """Load a checked session state (the scaler's part too unless ``scaler`` is False);
        returns its step count."""
        if scaler:
            self.scaler.load_state_dict(state["scaler"])
        if model is not None and "fp8" in state:
            load_fp8_state(model, state["fp8"])
        return int(state["steps"])

    def save(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizers: tuple[torch.optim.Optimizer, ...],
        steps: int,
        session_model: nn.Module | None,
        extra: dict[str, Any],
    ) -> None:
        """Write a checkpoint: see :meth:`mixprec.MixedPrecision.save`."""
        model = _uncompiled(model)
        if _saves_sharded(path):
            state = {"mixed_precision": self.session_state(steps, session_model), "extra": extra}
            from mixprec.distributed import checkpoint as sharded_checkpoint

            sharded_checkpoint.save(path, model, optimizers, state=state)
            return
        save_checkpoint(
            path,
            {
                "model": _without_compile_prefix(model.state_dict()),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "mixed_precision": self.session_state(steps, session_model),
                "rng": torch.get_rng_state(),
                "extra": extra,
            },
        )

    def load(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizers: tuple[torch.optim.Optimizer, ...],
        session_model: nn.Module | None,
        strict: bool = False,
    ) -> tuple[dict[str, Any], int]:
        """Read a checkpoint, checked whole before anything changes; returns its ``extra``
        values and step count. See :meth:`mixprec.MixedPrecision.load`."""
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {type(strict).__name__} {strict!r}")
        model = _uncompiled(model)
        if Path(path).is_dir():  # a sharded checkpoint folder
            return self._load_sharded(path, model, optimizers, session_model, strict)
        record = load_checkpoint(path)
        saved_optimizers = record.get("optimizers")
        extra = record.get("extra", {})
        weights: Any = record.get("model")
        if isinstance(weights, Mapping):
            weights = _keys_of(model, weights)
            _move_fp8_histories(model, weights, record.get("mixed_precision"))
        try:
            check_model_state(model, weights)
            if not isinstance(saved_optimizers, list) or len(saved_optimizers) != len(optimizers):
                count = (
                    len(saved_optimizers) if isinstance(saved_optimizers, list) else "no list of"
                )
                raise ValueError(
                    f"it holds {count} optimizer states; {len(optimizers)} optimizers were given"
                )
            if not isinstance(extra, Mapping):
                raise ValueError(f"its 'extra' is a {type(extra).__name__}, not a dict")
            scaler = self.check(
                record.get("mixed_precision"), session_model, len(optimizers), strict
            )
            check_optimizer_states(optimizers, saved_optimizers)
            check_rng_state(record.get("rng"))
            load_optimizers(optimizers, saved_optimizers)  # each checks its own fields first
        except ValueError as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: {err}") from None
        model.load_state_dict(weights)
        steps = self.load_session_state(record["mixed_precision"], session_model, scaler)
        torch.set_rng_state(record["rng"])
        return dict(extra), steps

    def _load_sharded(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizers: tuple[torch.optim.Optimizer, ...],
        session_model: nn.Module | None,
        strict: bool,
    ) -> tuple[dict[str, Any], int]:
        scaler: list[bool] = []

        def check(state: Mapping[str, Any]) -> None:
            session = state.get("mixed_precision")
            scaler.append(self.check(session, session_model, len(optimizers), strict))
            if not isinstance(state.get("extra", {}), Mapping):
                raise ValueError("its 'extra' is not a dict")

        from mixprec.distributed import checkpoint as sharded_checkpoint

        state = sharded_checkpoint.load(path, model, optimizers, check_state=check)
        steps = self.load_session_state(state["mixed_precision"], session_model, all(scaler))
        return dict(state.get("extra", {})), steps


_COMPILE_PREFIX = "_orig_mod."


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wraps, or ``model`` itself when it is not compiled."""
    inner = getattr(model, "_orig_mod", None)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    return inner if compiled and isinstance(inner, nn.Module) else model


def _without_compile_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with the ``_orig_mod.`` that compiled (sub)modules add to their keys removed."""
    return {str(key).replace(_COMPILE_PREFIX, ""): value for key, value in state.items()}


def _keys_of(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` keyed as ``model.state_dict()`` is, whichever of them went through compile."""
    own = {key.replace(_COMPILE_PREFIX, ""): key for key in model.state_dict()}
    plain = _without_compile_prefix(state)
    return {own.get(key, key): value for key, value in plain.items()}


def _move_fp8_histories(model: nn.Module, weights: dict[str, Any], session: Any) -> None:
    """Checkpoints written before the session kept the FP8 amax histories hold them in the
    model's entries: move them to the session state, where they are loaded from now."""
    suffix = ".fp8_amax_history"
    legacy = [k for k in weights if k.endswith(suffix) and k not in model.state_dict()]
    if legacy and isinstance(session, dict) and "fp8" not in session:
        session["fp8"] = {k[: -len(suffix)]: weights.pop(k) for k in legacy}


def _saves_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether a save to ``path`` writes a sharded checkpoint folder: under a process group, or
    into an existing folder."""
    return distributed() or Path(path).is_dir()
