"""Part 4 graded test: a preempted sequence resumes before any sequence that arrived after it.

vLLM's scheduler puts a preempted request back at the *front* of the waiting queue and
admits strictly first-come-first-served: when the head of the queue does not fit, nobody
behind it is admitted either (otherwise a long preempted request could starve behind a
stream of short new ones). The engine is faked as in ``test_part4_scheduler``.
"""

from __future__ import annotations

import pytest

from servinglab.sequence import SequenceStatus
from test_part4_scheduler import FakeEngine


@pytest.mark.part(4)
@pytest.mark.points(3)
def test_preempted_sequence_resumes_before_later_arrivals(block_manager, scheduler) -> None:
    eng = FakeEngine(block_manager, scheduler, num_blocks=4, block_size=4)
    a, b = eng.add(7, max_tokens=6), eng.add(7, max_tokens=4)  # 2 blocks each: the pool is full
    eng.step()
    later = [eng.add(2, max_tokens=2) for _ in range(3)]  # short requests that arrive after b
    first_step: dict[int, int] = {}
    preempted_at = None
    for step in range(1, 200):
        if not eng.sched.has_unfinished():
            break
        out = eng.step()
        if b in out.preempted and preempted_at is None:
            preempted_at = step
        for s in out.scheduled:
            if preempted_at is not None and s.seq is b and b.seq_id not in first_step:
                first_step[b.seq_id] = step
            if any(s.seq is c for c in later):
                first_step.setdefault(s.seq.seq_id, step)
    assert preempted_at is not None, "a needs a third block with the pool full: b, the newest, must be preempted"
    assert b.seq_id in first_step, "b was preempted and never resumed"
    for c in later:
        assert c.seq_id in first_step, f"sequence {c.seq_id} never ran"
        assert first_step[b.seq_id] <= first_step[c.seq_id], (
            f"sequence {c.seq_id} arrived after b but ran at step {first_step[c.seq_id]}, before b resumed at step "
            f"{first_step[b.seq_id]}: a preempted sequence goes back to the front of the waiting queue, and admission "
            "stops at the first waiting sequence that does not fit"
        )
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in [a, b, *later])
    eng.assert_all_free()
