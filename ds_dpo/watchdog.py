"""Ending a job within seconds when one of its ranks is gone, with a message that says which.

A rank that dies (the out-of-memory killer, a driver fault, a lost node) leaves the others in their next collective:
NCCL waits there for ``ddp_timeout`` (30 min by default) while every GPU of the job is billed; gloo fails at once, but
with a traceback that names no rank. So each rank keeps one TCP connection to rank 0 for the whole run, beside the
process group: a process that ends closes it (the kernel does, even after SIGKILL), and a hung or unreachable node
stops sending the heartbeat that travels on it. Rank 0 hears of a lost rank first, says which rank, host and process
it was and where the last whole checkpoint is, tells the other ranks, and every rank exits with ``PEER_LOST``.
Losing rank 0 itself, every rank learns at once; the first rank of each node says so.

Ends that the ranks agree on (finished, preempted, stopped on non-finite steps) are announced with ``done`` and
are not losses. A rank that stops on an error it reported itself (bad data, a checkpoint it could not write) sends
its exit status; the others then exit quietly with the same status. A verdict is acted on after ``GRACE_S``, so that
ranks failing together on the same error each report it their own way instead of as a lost peer.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

PEER_LOST = 4
"""Exit status of every rank when a rank of the job was lost."""
GRACE_S = 2.0
"""How long a verdict waits for this rank's own main thread to end the run first."""
BEAT_S = 1.0
"""Heartbeat period, both ways."""
FAREWELL_S = 2.0
"""How long an ending rank waits for the other side of its connections to have read its last word."""


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


@dataclass(frozen=True)
class Verdict:
    status: int
    message: str | None
    """Printed by this rank (None: another rank prints it)."""


class _Channel:
    """One connection, read as lines."""

    def __init__(self, sock: socket.socket, peer: Peer | None = None):
        self.sock, self.peer, self.buffer = sock, peer, b""
        self.heard = time.monotonic()
        self.ended: str | None = None  # what the other side said before closing: `done` or `failed ...`

    def send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # it is gone: reading it says so

    def read(self) -> tuple[list[str], bool]:
        """The complete lines received (those read with the hello included), and whether the other side has closed
        the connection."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return [], False
        except OSError:
            data = b""
        if data:
            self.heard = time.monotonic()
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines], not data


class Watchdog:
    """This rank's side of the job's liveness links; a daemon thread does the work.

    ``describe_progress`` is called when a rank is lost and returns what an operator needs next (where the last whole
    checkpoint is)."""

    def __init__(self, rank: int, local_rank: int, timeout_s: float, describe_progress: Callable[[], str]):
        self.rank, self.local_rank, self.timeout_s = rank, local_rank, timeout_s
        self.describe_progress = describe_progress
        self._closed = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._channels: list[_Channel] = []
        self.verdict: Verdict | None = None
        self._decided = threading.Event()

    @classmethod
    def start(cls, timeout_s: float, describe_progress: Callable[[], str]) -> Watchdog:
        """Collective, right after the process group exists: rank 0 listens, every other rank connects to it."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        watchdog = cls(rank, int(os.environ.get("LOCAL_RANK", 0)), timeout_s, describe_progress)
        me = Peer(rank, socket.gethostname(), os.getpid())
        listener = None
        if rank == 0:
            if socket.has_dualstack_ipv6():
                listener = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                listener = socket.create_server(("", 0))
            address = [(me, listener.getsockname()[1])]
        else:
            address = [None]
        torch.distributed.broadcast_object_list(address, src=0)
        rank0, port = address[0]
        if rank == 0:
            listener.settimeout(300)
            for _ in range(world - 1):  # every rank connects right after the broadcast
                sock, _ = listener.accept()
                sock.settimeout(300)
                received = b""
                while b"\n" not in received:  # `hello RANK HOST PID`; heartbeats may follow at once
                    received += sock.recv(4096) or b"\n"
                hello, _, rest = received.partition(b"\n")
                _, peer_rank, host, pid = hello.decode().split()
                sock.setblocking(False)
                channel = _Channel(sock, Peer(int(peer_rank), host, int(pid)))
                channel.buffer = rest
                watchdog._add(channel)
            listener.close()
        else:
            sock = socket.create_connection((os.environ.get("MASTER_ADDR", "127.0.0.1"), port), timeout=300)
            sock.sendall(f"hello {me.rank} {me.host} {me.pid}\n".encode())
            sock.setblocking(False)
            watchdog._add(_Channel(sock, rank0))
        threading.Thread(target=watchdog._run, name="ds_dpo-watchdog", daemon=True).start()
        return watchdog

    def _add(self, channel: _Channel) -> None:
        self._channels.append(channel)
        self._selector.register(channel.sock, selectors.EVENT_READ, channel)

    # --- the main thread's side ---------------------------------------------------------------------------------

    def close(self, status: int | None, error: str | None = None) -> None:
        """This rank is ending: ``status`` 0 -> ``done`` (an end every rank agreed on); another status, which this
        rank reported itself -> the others exit with it; None (an unexpected ``error``) -> the others report this
        rank as lost, with the error. Stops the watch: from now on this rank ends as its main thread decides."""
        if self._closed.is_set():
            return
        self._closed.set()
        if status == 0:
            line = "done"
        elif status is not None:
            line = f"failed {status}"
        else:
            line = f"crashed {' '.join((error or 'an unexpected error (see its output)').split())[:500]}"
        # A socket closed with unread data (the other side's heartbeats) is reset, and the reset discards what it
        # sent last, this line included: half-close, then read until the other side has closed too.
        deadline = time.monotonic() + FAREWELL_S
        for channel in self._channels:
            channel.send(line)
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_WR)
        for channel in self._channels:
            with contextlib.suppress(OSError):
                while (left := deadline - time.monotonic()) > 0:
                    channel.sock.settimeout(left)
                    if not channel.sock.recv(65536):
                        break
            with contextlib.suppress(OSError):
                channel.sock.close()

    def wait_for_verdict(self, timeout_s: float = GRACE_S + 2 * BEAT_S) -> None:
        """On an unexpected error in this rank's main thread: if it comes from a lost rank (gloo fails at once when
        a peer's connections close), let the verdict end the process with its message instead of a traceback.
        Returns if none comes within ``timeout_s``. Meanwhile SIGTERM is ignored: the ``deepspeed`` launcher sends it
        to every rank as soon as one has died, and would end this one before it says why."""
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if self._decided.wait(timeout_s):
                time.sleep(GRACE_S + 5)  # the watchdog thread ends the process meanwhile
        finally:
            signal.signal(signal.SIGTERM, previous)

    # --- the watchdog thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._watch()
        except (OSError, ValueError):  # the main thread closed the connections under the selector
            if not self._closed.is_set():
                raise

    def _watch(self) -> None:
        next_beat = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_beat:
                for channel in self._channels:
                    if channel.ended is None:
                        channel.send("beat")
                next_beat = now + BEAT_S
            for key, _ in self._selector.select(timeout=BEAT_S / 4):
                self._receive(key.data)
            for channel in self._channels:
                if channel.ended is None and time.monotonic() - channel.heard > self.timeout_s:
                    self._lost(
                        channel, f"has not been heard from for {self.timeout_s:g} s: its node hung or is unreachable"
                    )
            if self.verdict is not None:
                self._act()
                return

    def _receive(self, channel: _Channel) -> None:
        lines, closed = channel.read()
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "done":
                channel.ended = "done"
            elif word == "failed":  # it reported its error itself: end with its status, quietly
                channel.ended = line
                self._decide(Verdict(int(rest), None), forward=f"stop {rest}")
            elif word == "crashed":
                channel.ended = line
                self._lost(channel, f"stopped with an error: {rest}")
            elif word == "stop" and self.rank != 0:  # rank 0 ended the job; it says why
                self._decide(Verdict(int(rest), None))
        if closed and channel.ended is None:
            self._lost(
                channel,
                "died: its process ended without a word (killed by a signal or the "
                "out-of-memory killer, or crashed: see its output above)",
            )
        if closed or channel.ended is not None:  # all it had to say is read: closing now resets nothing
            self._selector.unregister(channel.sock)
            channel.sock.close()
            channel.ended = channel.ended or "closed"

    def _lost(self, channel: _Channel, how: str) -> None:
        channel.ended = channel.ended or "lost"
        peer = channel.peer
        if self.rank != 0 and not (self.local_rank == 0 or self.rank == 1):
            message = None  # rank 0 was lost: the first rank of each node (rank 1 on rank 0's node) says so
        else:
            try:
                progress = self.describe_progress()
            except Exception as e:  # the message must go out whatever the filesystem does
                progress = f"where the last checkpoint is could not be read ({type(e).__name__}: {e})"
            message = (
                f"{peer} {how}. Every rank of the job was stopped; {progress}. Restart the same "
                "command with `--resume_from_checkpoint auto` (or run it under launch/retry.py)"
            )
        self._decide(Verdict(PEER_LOST, message), forward=f"stop {PEER_LOST}")

    def _decide(self, verdict: Verdict, forward: str | None = None) -> None:
        if self.verdict is not None:
            return
        self.verdict = verdict
        if self.rank == 0 and forward:
            for channel in self._channels:
                if channel.ended is None:
                    channel.send(forward)
        self._decided.set()

    def _act(self) -> None:
        if self._closed.wait(GRACE_S):
            return  # this rank's main thread is ending the run itself
        if self.verdict.message:
            # on a line of its own: a progress bar may have left the cursor at the end of its line
            print(f"\nds_dpo: {self.verdict.message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(self.verdict.status)
