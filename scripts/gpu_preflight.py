"""Before `make test-gpu`: fail fast, naming what is missing, and say which cells will skip.

A GPU runner often has no package registry: what the course adds to its Python comes
from `make gpu-wheels` (and the model from `make gpu-model`). A missing package would
otherwise surface as a traceback in some notebook cell minutes in; here it is named at
once, with the fix. Then one line says whether the prepared model, vLLM and CUDA are
there, and how many notebook cells will therefore print "skipped" instead of running.
Exit status 1 when a package is missing or no CUDA device is visible.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# import name -> the distribution `make gpu-wheels` (or the GPU image) provides.
NEEDED: dict[str, str] = {
    "torch": "torch", "triton": "triton", "transformers": "transformers", "safetensors": "safetensors",
    "pytest": "pytest", "hypothesis": "hypothesis", "scipy": "scipy", "matplotlib": "matplotlib", "tqdm": "tqdm",
    "psutil": "psutil", "prometheus_client": "prometheus-client", "nbval": "nbval", "nbclient": "nbclient",
    "ipykernel": "ipykernel", "fastapi": "fastapi", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
    "httpx": "httpx", "openai": "openai", "torchao": "torchao", "onnx": "onnx", "onnxruntime": "onnxruntime",
    "nbgrader": "nbgrader",
}


def missing_packages() -> list[str]:
    """Distributions whose module cannot be found (found without importing: fast)."""
    return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def skipped_cells(lacking: set[str]) -> dict[str, int]:
    """Per notebook, the code cells whose ``# requires:`` marker names something in ``lacking``."""
    from servinglab.course.notebook import cell_requirements

    counts: dict[str, int] = {}
    for path in sorted((ROOT / "notebooks" / "day51").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        n = sum(1 for c in cells if c["cell_type"] == "code"
                and set(cell_requirements("".join(c["source"]).splitlines(keepends=True)) or ()) & lacking)
        if n:
            counts[path.stem] = n
    return counts


def main() -> int:
    missing = missing_packages()
    if missing:
        print(f"make test-gpu: missing Python packages: {', '.join(missing)}.\n"
              "  With a registry: `make setup` (or pip install them). Without one: `make gpu-wheels` on a machine\n"
              "  with a registry, copy .gpu_wheels/ over, then\n"
              "  python3 -m pip install --no-index --no-deps --target .gpu_site .gpu_wheels/*.whl\n"
              "  PYTHONPATH=$PWD/.gpu_site make test-gpu GPU_PY=python3", file=sys.stderr)
        return 1
    import torch

    if not torch.cuda.is_available():
        print("make test-gpu: no CUDA device is visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    from servinglab.course.notebook import REQUIREMENTS, missing_requirements

    lacking = {name for name in REQUIREMENTS if missing_requirements(name)}
    counts = skipped_cells(lacking)
    print(f"make test-gpu on {torch.cuda.get_device_name(0)}: model {'no' if 'model' in lacking else 'yes'}, "
          f"vLLM {'no' if 'vllm' in lacking else 'yes'}; "
          + (f"{sum(counts.values())} notebook cells will skip for lack of {', '.join(sorted(lacking))} "
             f"({', '.join(f'{k[:2]}: {v}' for k, v in counts.items())})" if counts else "every notebook cell will run"))
    if "model" in lacking:
        print("  the model: `make gpu-model` here, then on the runner (see setup_guide.md, 'A GPU runner without a registry')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
