"""Stopping cleanly on SIGTERM/SIGINT (SLURM preemption, Ctrl-C) or before a deadline (``max_time``, the SLURM job's
end): every rank stops at the same optimizer step.

Ranks may see a signal at different times (the ``deepspeed`` launcher forwards SIGTERM to its ranks one after
another), so the decision is a collective at each step boundary: if any rank has been signalled, all stop, the
checkpoint is saved, and the process exits 0. Further SIGTERMs while saving are absorbed; a second Ctrl-C exits at
once. The launcher SIGKILLs a rank still alive 30 s after forwarding SIGTERM: the save must fit in that window
(under SLURM, ``#SBATCH --signal=TERM@120`` sends the warning 120 s before the deadline).

A deadline needs no signal: at each step boundary every rank asks whether one more step and then a save would still
end before it, each taken as long as the longest interval between two step boundaries so far (those intervals hold
the saves made at them, so once one save has happened a save is covered); if any rank thinks not, all stop and save
there.
"""

from __future__ import annotations

import signal
import time

import torch

from ds_dpo.distributed import max_over_ranks

# why a rank wants to stop, reduced to the strongest reason over ranks, and how the run ends then
_SIGNAL, _DEADLINE = 2.0, 1.0
_REASONS = {_SIGNAL: "preempted", _DEADLINE: "deadline"}


class PreemptionGuard:
    def __init__(self, deadline: float | None = None):
        self.requested = False
        self.deadline = deadline
        """``time.time()`` to have stopped by; None: none."""
        self.reason = ""
        """Once ``agreed_stop`` is True, how the run ends: ``preempted`` (a signal) or ``deadline``."""
        self._previous: dict[int, object] = {}
        self._boundary = time.monotonic()
        self._longest = 0.0

    def __enter__(self) -> PreemptionGuard:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        self.requested = True

    def agreed_stop(self, device: torch.device) -> bool:
        """Collective (one all-reduce of a scalar), at each step boundary: True on every rank once any rank was
        signalled or sees the deadline too near for another step and a save (``reason`` says which)."""
        now = time.monotonic()
        self._longest, self._boundary = max(self._longest, now - self._boundary), now
        near = self.deadline is not None and time.time() + 2 * self._longest >= self.deadline
        why = max_over_ranks(_SIGNAL if self.requested else _DEADLINE if near else 0.0, device)
        self.reason = _REASONS.get(why, "")
        return bool(why)
