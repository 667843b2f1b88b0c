"""Stopping cleanly on SIGTERM/SIGINT (SLURM preemption, Ctrl-C): every rank stops at the same optimizer step.

Ranks may see a signal at different times (the ``deepspeed`` launcher forwards SIGTERM to its ranks one after
another), so the decision is a collective at each step boundary: if any rank has been signalled, all stop, the
checkpoint is saved, and the process exits 0. Further SIGTERMs while saving are absorbed; a second Ctrl-C exits at
once. The launcher SIGKILLs a rank still alive 30 s after forwarding SIGTERM: the save must fit in that window
(under SLURM, ``#SBATCH --signal=TERM@120`` sends the warning 120 s before the deadline).
"""

from __future__ import annotations

import signal

import torch

from ds_dpo.distributed import any_rank


class PreemptionGuard:
    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

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
        """Collective (one all-reduce of a scalar): True on every rank once any rank was signalled."""
        return any_rank(self.requested, device)
