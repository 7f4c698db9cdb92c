"""The notebooks' ``# requires:`` marker: what counts as missing, and what a marked cell becomes."""

from __future__ import annotations

import contextlib
import io

import IPython
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from servinglab.course import notebook as nbmod
from servinglab.course.notebook import (
    enable_requires_marker,
    missing_requirements,
    skip_if_missing,
)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """A machine with the model and vLLM but no CUDA device, whatever this one has."""
    monkeypatch.delenv(nbmod.WITHOUT_ENV, raising=False)
    monkeypatch.setattr(nbmod, "is_prepared", lambda: True)
    monkeypatch.setattr(nbmod, "_has_vllm", lambda: True)
    monkeypatch.setattr(nbmod.torch.cuda, "is_available", lambda: False)
    return monkeypatch


def printed(lines: list[str]) -> str:
    """What the (transformed) cell prints when it runs."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("".join(lines), "<cell>", "exec"), {})  # noqa: S102 - the cell's own code
    return out.getvalue()


def test_missing_requirements_names_what_is_absent(machine):
    assert missing_requirements(["model", "vllm"]) == []
    assert missing_requirements("model") == []
    (cuda,) = missing_requirements(["model", "cuda"])
    assert "CUDA" in cuda
    machine.setattr(nbmod, "is_prepared", lambda: False)
    (model,) = missing_requirements(["model", "vllm"])
    assert "model is not prepared" in model and "servinglab prepare-model" in model


def test_unknown_requirement_is_an_error_naming_the_allowed_values(machine):
    with pytest.raises(ValueError, match="gpu") as err:
        missing_requirements(["model", "gpu"])
    assert all(name in str(err.value) for name in ("model", "vllm", "cuda"))


def test_servinglab_without_rehearses_a_machine_that_lacks_them(machine):
    machine.setenv(nbmod.WITHOUT_ENV, "model, vllm")
    reasons = missing_requirements(["model", "vllm"])
    assert len(reasons) == 2
    assert "servinglab prepare-model" in reasons[0] and "vLLM" in reasons[1]
    assert all(f"{nbmod.WITHOUT_ENV}=model, vllm" in r for r in reasons), "the reason says it was rehearsed"
    machine.setenv(nbmod.WITHOUT_ENV, "vllm")
    assert missing_requirements(["model"]) == [] and len(missing_requirements(["vllm"])) == 1
    machine.setenv(nbmod.WITHOUT_ENV, "vlm")
    with pytest.raises(ValueError, match="vlm"):
        missing_requirements(["model"])


def test_marked_cell_is_kept_when_everything_is_here(machine):
    cell = ["# requires: model, vllm\n", "x = 1\n"]
    assert skip_if_missing(cell) == cell
    spaced = ["#  requires :model ,vllm  \n", "x = 1\n"]
    assert skip_if_missing(spaced) == spaced
    machine.setenv(nbmod.WITHOUT_ENV, "vllm")
    assert printed(skip_if_missing(spaced)).startswith("skipped (missing: vllm)"), "spaces are allowed"


def test_marked_cell_is_skipped_with_the_reason_naming_the_requirement(machine):
    machine.setenv(nbmod.WITHOUT_ENV, "vllm")
    out = printed(skip_if_missing(["# requires: model, vllm\n", "raise RuntimeError('must not run')\n"]))
    assert out.startswith("skipped (missing: vllm): vLLM is not installed")
    assert "model" not in out.split(":")[1], "only what is missing is named"
    out = printed(skip_if_missing(["# requires: cuda\n", "import torch\n", "torch.ones(1, device='cuda')\n"]))
    assert out.startswith("skipped (missing: cuda): no CUDA device")


def test_unmarked_cells_are_untouched(machine):
    machine.setenv(nbmod.WITHOUT_ENV, "model,vllm")
    for cell in (["x = 1\n"], [], ["x = 1\n", "# requires: model\n"], ["# Requires: model\n", "x = 1\n"],
                 ["# requires model\n"], ["# required: model\n"], ["print(1)  # requires: model\n"]):
        assert skip_if_missing(cell) == cell, cell


def test_a_typo_in_a_marker_fails_everywhere(machine):
    for bad in ("# requires: modle\n", "# requires:\n", "# requires: model,\n"):
        with pytest.raises(ValueError):
            skip_if_missing([bad, "x = 1\n"])


def test_ipython_runs_the_transformer(machine):
    machine.setenv(nbmod.WITHOUT_ENV, "model")
    manager = TransformerManager()
    manager.cleanup_transforms.append(skip_if_missing)
    skipped = manager.transform_cell("\n# requires: model\nawait something()\n")
    assert printed([skipped]).startswith("skipped (missing: model)")
    assert manager.transform_cell("x = 1\n") == "x = 1\n"


def test_enable_requires_marker_registers_once_and_summarizes(machine):
    class Shell:
        def __init__(self) -> None:
            self.input_transformers_cleanup: list = []

    shell = Shell()
    machine.setattr(IPython, "get_ipython", lambda: shell)
    machine.setenv(nbmod.WITHOUT_ENV, "vllm")
    summary = enable_requires_marker()
    enable_requires_marker()
    (registered,) = shell.input_transformers_cleanup
    cell = ["# requires: vllm\n", "import vllm\n"]
    assert printed(registered(cell)).startswith("skipped (missing: vllm)")
    machine.setenv(nbmod.WITHOUT_ENV, "model")  # what a solution cell could try
    assert registered(["# requires: model\n", "x = 1\n"]) == ["# requires: model\n", "x = 1\n"], \
        "the registered transformer decides at set-up: a later SERVINGLAB_WITHOUT must not skip graded cells"
    assert "model yes" in summary and "vLLM no" in summary and "CUDA no" in summary
    assert f"{nbmod.WITHOUT_ENV}=vllm" in summary and "\n" not in summary
    machine.setenv(nbmod.WITHOUT_ENV, "vllm")
    machine.setattr(IPython, "get_ipython", lambda: None)
    assert enable_requires_marker() == summary, "outside IPython it only summarizes"


def test_part_requirement_waits_for_the_parts_stubs(machine):
    """``# requires: partN`` skips while Part N has stubs (naming them), and runs on a finished part."""
    from servinglab.impl import stubs_left, use_impl

    assert stubs_left(4, "solutions") == []
    assert "Scheduler.schedule" in stubs_left(4, "exercises")
    cell = ["# requires: model, part4\n", "print('ran')\n"]
    with use_impl("exercises"):
        out = printed(skip_if_missing(cell))
        assert out.startswith("skipped (missing: part4): Part 4 (scheduler, admission, preemption) still has stubs: ")
        assert "Scheduler.schedule" in out and "rerun this cell" in out
    with use_impl("solutions"):
        assert printed(skip_if_missing(cell)) == "ran\n"
    with pytest.raises(ValueError, match="part1 .. part9"):
        skip_if_missing(["# requires: part12\n", "pass\n"])
    with pytest.raises(ValueError, match="allowed: model, vllm, cuda"):
        missing_requirements(["part4"])  # $SERVINGLAB_WITHOUT and missing_requirements name machine needs only
