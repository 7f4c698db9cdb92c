"""Shared pytest set-up: the ``--impl`` switch, part fixtures, the tiny model config.

``pytest --impl solutions`` runs the graded tests against the reference code,
``pytest --impl exercises`` (the default, like ``$SERVINGLAB_IMPL``) against the
student's stubs. Each part is a fixture named after its module, e.g. ``kv_cache``.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without CUDA, Triton kernels (Part 3b, servinglab.model.triton) run through Triton's
# interpreter. Triton reads TRITON_INTERPRET when it is first imported (transformers
# imports it), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from servinglab import impl as impl_mod  # noqa: E402

# Deterministic property tests: the same examples on every run and every machine.
settings.register_profile(
    "course", derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("course")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--impl",
        choices=impl_mod.IMPLS,
        default=None,
        help=f"code under test: exercises (student stubs) or solutions (reference); default ${impl_mod.ENV_VAR} or exercises",
    )


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--impl")
    if chosen:
        impl_mod.set_impl(chosen)
        # Subprocesses (servers, notebooks) follow the same choice.
        os.environ[impl_mod.ENV_VAR] = chosen


def pytest_report_header(config: pytest.Config) -> str:
    return f"servinglab impl: {impl_mod.current_impl()}"


def _part_fixture(name: str):
    @pytest.fixture(name=name)
    def _fixture() -> ModuleType:
        return impl_mod.load_part(name)

    _fixture.__doc__ = f"The {name} module of the implementation under test."
    return _fixture


for _name in impl_mod.MODULES:
    globals()[f"fixture_{_name}"] = _part_fixture(_name)
