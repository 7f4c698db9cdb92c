"""The bench room: one module per ``servinglab bench ...`` benchmark.

Each runs the compared systems in one run on one machine (the lab engine, vLLM through
:mod:`.vllm_baseline`, transformers) and reports ratios; :mod:`.workloads` makes the
seeded request sets and :mod:`.profiling` the per-role decode-step profile. On a GPU:
:mod:`.attention` (decode kernels' HBM bandwidth), :mod:`.gpu_throughput` (graphs on/off
vs transformers, with :mod:`.gpu_models` random weights and :mod:`.gpu_profile`).

May import: :mod:`servinglab.serving`, :mod:`servinglab.engine` and below. Never course.
"""
