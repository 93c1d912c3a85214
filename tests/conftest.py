"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Some workers switch torch to float64 (they also run in spawned ranks); keep that out of later tests."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
