"""Shared fixtures: the real third-party data beside the checkout, and deterministic seeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository (DESIGN.md, real data); tests needing it skip if it is absent."""
    if not (SHARED / "data" / "real").is_dir():
        pytest.skip("../shared/data/real is not present beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def calogan_real_file(shared_dir: Path) -> Path:
    """51 Geant4 CaloGAN e+ showers (HEPCAT copy of the CaloGAN generation output)."""
    return shared_dir / "data" / "real" / "hepcat-calogan" / "test.h5"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tests' tensors are small: one intra-op thread is faster on the 2-core machine and immune to load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
