"""Shared fixtures: the tiny random CLIP and a small, fast configuration."""

from __future__ import annotations

import pytest
import torch

from t2l_fast.config import Config, preset
from t2l_fast.models.clip import Clip, build_test_tiny

# CLI arguments for a fast CPU run: the tiny test CLIP, a small generator, two views.
FAST_CLI = [
    "--clip",
    "test-tiny",
    "--device",
    "cpu",
    "--set",
    "generator.channels_down=8",
    "--set",
    "generator.channels_up=8",
    "--set",
    "views.n_aug=2",
]


@pytest.fixture(scope="session")
def tiny_clip() -> Clip:
    return build_test_tiny()


def small_config(steps: int = 2, **loss) -> Config:
    """A configuration that runs in about a second a step on a CPU (tiny generator, few views)."""
    cfg = preset("image")
    cfg.prompt = "a golden cat"
    cfg.optim.steps = steps
    cfg.views.n_aug = 3
    cfg.data.size = 0
    cfg.generator.channels_down = 8
    cfg.generator.channels_up = 8
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg


@pytest.fixture
def image() -> torch.Tensor:
    """A smooth synthetic RGB image (3, 140, 170) in [0, 1]."""
    y = torch.linspace(0, 1, 140).view(1, -1, 1)
    x = torch.linspace(0, 1, 170).view(1, 1, -1)
    return torch.cat([x.expand(1, 140, 170), y.expand(1, 140, 170), (x * y).expand(1, 140, 170)], 0)
