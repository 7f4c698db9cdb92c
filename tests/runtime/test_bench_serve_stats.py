"""``bench serve``'s table is computed by Part 6's statistics (the reference parts here):
it must equal numpy's on the same client-side timestamps."""

from __future__ import annotations

import numpy as np

from servinglab.bench.serve import RequestResult, summarize


def test_summarize_uses_part6_and_matches_numpy():
    results = [
        RequestResult(8, 4, 0.0, [0.10, 0.12, 0.15, 0.19], 4),
        RequestResult(8, 2, 0.05, [0.30, 0.31], 2),
        RequestResult(8, 1, 0.10, [0.40], 1),
        RequestResult(8, 3, 0.2, [], 0, error="HTTP 400: bad"),
    ]
    got = summarize(results, duration=0.5)
    assert (got["completed"], got["failed"], got["total_output_tokens"]) == (3, 1, 7)
    ok = results[:3]
    want = {
        "ttft": [r.chunk_times[0] - r.start for r in ok],
        "e2e": [r.chunk_times[-1] - r.start for r in ok],
        "itl": [g for r in ok for g in np.diff(r.chunk_times)],
        "tpot": [(r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
    }
    for name, values in want.items():
        ms = np.array(values) * 1000
        assert abs(got[f"mean_{name}_ms"] - ms.mean()) < 1e-9, name
        for p in (50, 90, 99):
            assert abs(got[f"p{p}_{name}_ms"] - np.percentile(ms, p)) < 1e-9, (name, p)
