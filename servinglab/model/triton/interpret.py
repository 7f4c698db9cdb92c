"""Run Triton kernels through Triton's interpreter on machines without CUDA.

Triton decides when it is first imported whether kernels (and its own helpers such as
``tl.sum``) are compiled for a GPU or interpreted with NumPy on the CPU, from the
``TRITON_INTERPRET`` environment variable. So on a CPU it has to be set before
anything imports triton, transformers included: the test suite sets it in
``tests/conftest.py``; a script or notebook sets it before its first import.
"""

from __future__ import annotations

import os
import sys

import torch


def interpreting() -> bool:
    """Whether Triton kernels in this process run through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_interpreter_without_gpu() -> bool:
    """Set ``TRITON_INTERPRET=1`` when no CUDA device is present (a value already set wins).

    Returns:
        Whether kernels run through the interpreter.

    Raises:
        RuntimeError: no CUDA device, and triton was already imported in compiled mode,
            so kernels could neither compile nor be interpreted.
    """
    if torch.cuda.is_available() or interpreting():
        return interpreting()
    if "triton" in sys.modules:
        raise RuntimeError(
            "no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set: set the environment "
            "variable TRITON_INTERPRET=1 before importing transformers or triton to run Triton kernels on a CPU"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return True
