"""``servinglab --help`` is quick: the CLI imports a command's module only when that command runs.

Checked by what gets imported, not by a clock: listing the commands must not load torch,
transformers or any of the modules behind the commands; asking for one command's help loads
that command's module (its options live there) and still runs nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "servinglab.serving.server", "servinglab.bench.quant", "servinglab.bench.router")

PROBE = """
import json, sys
from servinglab import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'servinglab'))}))
"""


def loaded_by(*argv: str) -> tuple[int, set[str], str]:
    """Run the CLI with ``argv`` in a fresh interpreter; its exit code, loaded modules and output."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], set(report["loaded"]), proc.stdout


@pytest.mark.parametrize("argv", [("--help",), ("bench", "--help")])
def test_help_imports_no_command_module(argv):
    code, loaded, out = loaded_by(*argv)
    assert code == 0 and "router" in out
    assert not loaded & set(HEAVY), f"`servinglab {' '.join(argv)}` imported {sorted(loaded & set(HEAVY))}"


def test_command_help_loads_only_that_command():
    code, loaded, out = loaded_by("router", "--help")
    assert code == 0 and "--backend" in out and "--read-timeout" in out
    assert "servinglab.serving.router" in loaded and "servinglab.bench.quant" not in loaded
