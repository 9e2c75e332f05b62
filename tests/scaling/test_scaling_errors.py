"""Every constructor error names the bad value and the valid range or choices."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mixprec.scaling import DynamicScaling, GradScaler

CASES = [
    (
        {"growth_factor": 1.0},
        ValueError,
        r"growth_factor must be a finite float > 1\.0, e\.g\. 2\.0, got 1\.0",
    ),
    ({"growth_factor": 0.5}, ValueError, r"growth_factor must be .* got 0\.5"),
    ({"growth_factor": math.inf}, ValueError, r"growth_factor must be .* got inf"),
    ({"growth_factor": "2"}, TypeError, r"growth_factor must be a float, got '2' of type str"),
    (
        {"backoff_factor": 0.0},
        ValueError,
        r"backoff_factor must be a float in \(0, 1\), e\.g\. 0\.5, got 0\.0",
    ),
    (
        {"backoff_factor": 1.0},
        ValueError,
        r"backoff_factor must be a float in \(0, 1\), .* got 1\.0",
    ),
    ({"backoff_factor": math.nan}, ValueError, r"backoff_factor must be .* got nan"),
    (
        {"growth_interval": 0},
        ValueError,
        r"growth_interval must be an int in \[1, 2\*\*31 - 1\] \(clean steps before growing\), "
        r"got 0",
    ),
    ({"growth_interval": 2**31}, ValueError, r"growth_interval must be an int .* got 2147483648"),
    (
        {"growth_interval": 100.0},
        TypeError,
        r"growth_interval must be an int, got 100\.0 of type float",
    ),
    (
        {"growth_interval": True},
        TypeError,
        r"growth_interval must be an int, got True of type bool",
    ),
    (
        {"init_scale": 0.0},
        ValueError,
        r"init_scale must be a finite float > 0 that float32 can hold .* got 0\.0",
    ),
    ({"init_scale": -8.0}, ValueError, r"init_scale must be .* got -8\.0"),
    ({"init_scale": math.inf}, ValueError, r"init_scale must be .* got inf"),
    ({"init_scale": math.nan}, ValueError, r"init_scale must be .* got nan"),
    (
        {"init_scale": 1e39},
        ValueError,
        r"init_scale must be .* \(at most 3\.403e\+38\), e\.g\. 2\.0\*\*16; got 1e\+39",
    ),
    ({"init_scale": 1e-46}, ValueError, r"init_scale must be .* got 1e-46"),
    ({"init_scale": "big"}, TypeError, r"init_scale must be a float, got 'big' of type str"),
    (
        {"hysteresis": 0},
        ValueError,
        r"hysteresis must be an int in \[1, 2\*\*31 - 1\] \(1 backs off on every overflow\), got 0",
    ),
    (
        {"consecutive_hysteresis": "yes"},
        TypeError,
        r"consecutive_hysteresis must be a bool, got 'yes'",
    ),
    (
        {"min_scale": 8.0, "max_scale": 4.0},
        ValueError,
        r"min_scale=8\.0 is larger than max_scale=4\.0; pass min_scale <= max_scale",
    ),
    (
        {"min_scale": 0.0},
        ValueError,
        r"min_scale must be None or a finite positive float32 number .* got 0\.0",
    ),
    (
        {"max_scale": math.inf},
        ValueError,
        r"max_scale must be None or a finite positive float32 number .* got inf",
    ),
    (
        {"max_scale": "4"},
        TypeError,
        r"max_scale must be a positive float or None, got '4' of type str",
    ),
    (
        {"init_scale": 2.0**16, "max_scale": 2.0**10},
        ValueError,
        r"init_scale=65536\.0 lies outside \[min_scale, max_scale\] = \[None, 1024\.0\]",
    ),
    (
        {"strategy": "fixed"},
        ValueError,
        r"strategy must be one of \('dynamic', 'static', 'none'\), got 'fixed'",
    ),
    (
        {"on_min_scale": "stop"},
        ValueError,
        r"on_min_scale must be one of \('continue', 'raise'\), got 'stop'",
    ),
    (
        {"process_group": "local"},
        ValueError,
        r"process_group must be 'auto' .*, None, 'world' or a torch\.distributed\.ProcessGroup, "
        r"got 'local'",
    ),
    (
        {"process_group": 3},
        TypeError,
        r"process_group must be 'auto' .*, None, 'world' or a torch\.distributed\.ProcessGroup, "
        r"got 3 of type int",
    ),
    (
        {"device": 3},
        TypeError,
        r"device must be a device type string such as 'cuda' or 'cpu', got 3 of type int",
    ),
    (
        {"device": "gpu"},
        ValueError,
        r"device must be a device type such as 'cuda' or 'cpu', got 'gpu'",
    ),
    ({"enabled": "yes"}, TypeError, r"enabled must be a bool, got 'yes' of type str"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), CASES, ids=[str(c[0]) for c in CASES])
def test_constructor_errors(kwargs: dict, error: type[Exception], message: str) -> None:
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(error, match=message):
        GradScaler(**kwargs)


def test_rule_dataclass_validates_the_same_way() -> None:
    with pytest.raises(
        ValueError, match=r"hysteresis must be an int in \[1, 2\*\*31 - 1\] .* got -1"
    ):
        DynamicScaling(hysteresis=-1)
    rule = DynamicScaling()
    with pytest.raises(AttributeError):
        rule.growth_factor = 3.0  # type: ignore[misc]  # frozen


def test_bounds_are_checked_only_for_the_dynamic_strategy() -> None:
    # A static scale above max_scale is legal: the bounds apply to the dynamic rule.
    assert (
        GradScaler("cpu", init_scale=2.0**16, max_scale=2.0**10, strategy="static").get_scale()
        == 2.0**16
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_disables_with_a_warning_like_torch() -> None:
    with pytest.warns(
        UserWarning, match=r"enabled for device 'cuda', but CUDA is not available; disabling it"
    ):
        scaler = GradScaler()
    assert not scaler.is_enabled()
    with pytest.warns(UserWarning):
        assert not torch.amp.GradScaler().is_enabled()


@pytest.mark.parametrize("strategy", ["static", "none"])
def test_dynamic_only_arguments_with_a_fixed_strategy_warn(strategy: str) -> None:
    # GradScaler(strategy="static", init_scale=1, min_scale=2) used to accept bounds it ignores.
    with pytest.warns(UserWarning, match=rf"strategy={strategy!r}.*min_scale=2.*ignored"):
        scaler = GradScaler("cpu", init_scale=1.0, min_scale=2.0, strategy=strategy)
    assert scaler.state_dict()["strategy"] == strategy  # still built: a warning, not a refusal
    with pytest.warns(UserWarning, match=r"growth_interval=1, hysteresis=2 .*ignored"):
        GradScaler("cpu", growth_interval=1, hysteresis=2, strategy=strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradScaler("cpu", init_scale=8.0, strategy=strategy)  # torch's defaults: nothing to say
        GradScaler("cpu", init_scale=2.0, min_scale=2.0, max_scale=4.0)  # dynamic uses them
