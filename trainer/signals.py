"""Graceful stop on SIGINT / SIGTERM.

The first signal only sets a flag; the trainer checks it at every optimizer-step boundary (all ranks
agree through a MAX all-reduce), saves a checkpoint and exits with status 0. A second signal aborts
at once (exit status 128 + signal number); the last complete checkpoint stays intact because
checkpoints are written under a temporary name and renamed.

Launchers forward signals: with ``kill -2 -PGID`` every worker gets the signal from ``kill`` *and*
a copy (SIGINT or SIGTERM) from torchrun / the deepspeed launcher a few milliseconds later. Under a
launcher, one more signal within ``forward_window`` seconds of the first is therefore taken as that
copy and ignored; any signal after that window (or a third one) aborts.

Exit statuses under the ``deepspeed`` launcher (deepspeed 0.19, single node; read from
``deepspeed/launcher/runner.py`` and ``launch.py`` and measured): the workers always save and exit 0, but the
``deepspeed`` command itself cannot report 0 after a SIGINT, because its runner installs no signal handler:

- ``kill -2 -PGID`` (the whole group): the runner dies in ``subprocess.wait()`` with a ``KeyboardInterrupt``
  traceback (exit status 130 in the shell); ``deepspeed.launcher.launch`` sends SIGTERM to every worker
  (taken as the forwarded copy, see above), waits up to 30 s for them (then SIGKILL: a stop-save longer than
  that is lost and the previous checkpoint stays), and exits 1. The workers' log ends with
  ``stopped by signal at step N``.
- ``kill -2 <runner PID>`` (the origin document's line): the runner dies the same way (traceback, 130);
  ``launch.py`` keeps running, the workers see the runner gone (:class:`LauncherWatch`), save, exit 0, and
  ``launch.py`` then exits 0 in the background.

So after a ``deepspeed`` SIGINT stop, check ``stopped by signal`` in the log (or the ``latest`` checkpoint),
not the exit status. A plain ``python`` run exits 0 (``torchrun`` reports the signal with its own
``SignalException``; its workers exit 0 too).
"""

from __future__ import annotations

import os
import signal
import sys
import time


class StopSignal:
    def __init__(self, forward_window: float = 0.0, log=None):
        self.forward_window = float(forward_window)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.first_at: float | None = None
        self.signum: int | None = None
        self.ignored = 0
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def install(self) -> StopSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def request(self, reason: str) -> None:
        """Ask for a graceful stop without a signal (e.g. the launcher went away)."""
        if self.first_at is None:
            self.first_at, self.signum = time.monotonic(), None
            self.log(f"[stop] {reason}: stopping at the next step boundary, saving a checkpoint")

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.signum = now, signum
            self.log(f"[stop] {name} received: stopping at the next step boundary, saving a checkpoint "
                     f"(send it again to abort without saving)")
            return
        if self.ignored == 0 and now - self.first_at <= self.forward_window:
            self.ignored += 1
            return
        self.log(f"[stop] second signal ({name}): aborting now; the last complete checkpoint is kept")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals (the main process handles them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class LauncherWatch:
    """Stop when the ``deepspeed`` command that started this worker exits.

    The origin document stops training with ``kill -2 $(ps -o pgid= -p PID)``: without a minus sign that
    signals only the process whose PID is the group id, i.e. the ``deepspeed`` runner. The runner then
    exits (single node: it does not forward the signal) while ``deepspeed.launcher.launch`` and the
    workers go on. Each worker therefore watches its launcher's parent: when the runner is gone (the
    launcher is re-parented), the trainer stops as for a signal. Linux only (``/proc``); inactive
    elsewhere and for other launchers.
    """

    def __init__(self, launcher: str):
        self.parent = os.getppid() if launcher == "deepspeed" else None
        self.grandparent = _ppid_of(self.parent) if self.parent else None
        if self.grandparent is not None:
            try:
                with open(f"/proc/{self.grandparent}/cmdline", "rb") as f:
                    if b"deepspeed" not in f.read():
                        self.grandparent = None
            except OSError:
                self.grandparent = None

    def gone(self) -> bool:
        if self.grandparent is None:
            return False
        now = _ppid_of(self.parent)
        return now is not None and now != self.grandparent
