"""The no-progress guard: an empty step with unfinished requests is a bug, not a wait.

In the offline engine nothing changes between two steps unless a step runs, so a step
that schedules nothing while requests are unfinished would repeat forever (``LLM.generate``
spins, a server request never finishes). The usual cause is in the student's Part 4: a
scheduler that never preempts when the pool is full, or never admits waiting sequences
when blocks are free. Raising names the state and the likely fix instead of hanging.
"""

from __future__ import annotations

from servinglab.interfaces import BlockManager, Scheduler


class NoProgressError(RuntimeError):
    """A step scheduled nothing although requests are unfinished (the engine would spin forever)."""


def raise_if_stalled(scheduler: Scheduler, block_manager: BlockManager) -> None:
    """Raise :class:`NoProgressError` when ``scheduler`` has unfinished sequences (an empty step was just taken)."""
    if not scheduler.has_unfinished():
        return
    waiting, running = len(scheduler.waiting), len(scheduler.running)
    free, total = block_manager.num_free_blocks, block_manager.num_blocks
    if running and not free:
        hint = ("the pool is full and running sequences need blocks: does Part 4 preempt (free the newest "
                "running sequence's blocks and put it back at the front of the waiting queue)?")
    elif waiting and free:
        hint = "blocks are free but nothing was admitted: does Part 4 admit waiting sequences (allocate_blocks, status RUNNING)?"
    else:
        hint = "check Part 4's token budget and admission rules"
    raise NoProgressError(
        f"the scheduler scheduled nothing although {waiting} sequences are waiting and {running} running, and the "
        f"pool has {free} free of {total} blocks: {hint}"
    )
