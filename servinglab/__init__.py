"""servinglab: the runtime that the course's graded parts plug into.

The runtime (model, runner, engine, server, benchmarks) is not graded. It calls each
graded part (``kv_cache``, ``block_manager``, ``paged_attention``, ``scheduler``, ...)
through :mod:`servinglab.impl`, which picks the student's ``exercises`` package or the
reference ``solutions`` package.
"""

__version__ = "0.1.0"
