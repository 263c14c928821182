"""Shared fixtures. Real data lives in ../shared/data beside the checkout (CI has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a real dataset; missing data fails in CI and skips only on a dev machine."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real data {path} is missing in CI")
        pytest.skip(f"real data {path} not available")
    return path
