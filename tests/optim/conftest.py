"""Fixtures of the optimizer-wrapper tests."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import SIXTEEN_BIT


@pytest.fixture(params=SIXTEEN_BIT, ids=["bf16", "fp16"])
def dtype16(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param
