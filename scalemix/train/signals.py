"""Signals around the training loop: SIGTERM stops like Ctrl-C, and a step commits atomically.

``deferred_signals()`` wraps the few lines in which a DP step becomes real (the privacy
ledger, the optimiser, the schedule, the EMA and the step counter advance together): a
SIGINT or SIGTERM that arrives inside is held and delivered, as ``KeyboardInterrupt``,
right after the block, so a checkpoint written on interruption never holds a model that
took a step the accountant did not count (or the reverse).

``interrupt_on_sigterm()`` turns SIGTERM (what SLURM, ``kill`` and container runtimes send)
into ``KeyboardInterrupt`` for the duration of a run, so that both stop the same way:
checkpoint, then exit.

Signal handlers can only be installed from the main thread; elsewhere both are no-ops
(Python delivers signals to the main thread only).
"""

from __future__ import annotations

import contextlib
import signal
import threading

_HANDLED = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_signals():
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in _HANDLED}

    def hold(signum, frame):
        pending.append(signum)

    for s in _HANDLED:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if pending:  # deliver it again, now to the handler that was in force before
        signal.raise_signal(pending[0])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupt_on_sigterm():
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
