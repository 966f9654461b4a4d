"""Where and with how many threads PyTorch runs: one place, shared by training, scoring and serving."""

from __future__ import annotations

import os

import torch


def default_device() -> str:
    """The first CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_threads() -> None:
    """Use every core unless the user pinned OMP_NUM_THREADS (torch's own default can be lower in containers)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
