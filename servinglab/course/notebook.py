"""Small helpers the course notebooks share (device choice, output folders)."""

from __future__ import annotations

from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA when present, else CPU: the same notebook serves laptops and GPU runners."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_summary() -> str:
    """One line naming the device the notebook will use."""
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu (no CUDA device: GPU-only cells print a reason and skip)"


def output_dir(notebook: str) -> Path:
    """``outputs/<notebook>/`` next to the notebook, for saved plots and tables."""
    path = Path.cwd() / "outputs" / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path
