"""SIGTERM and SIGINT: stop at a resumable point, say so in one line, exit 128 + the signal.

`handled()` (entered by `moe`'s main around every command) turns both signals into
`Interrupted`, raised wherever the process is, so any command stops with one line instead of a
traceback (SIGINT) or a silent death (SIGTERM). While a training stage runs, `deferred()` holds
the first signal instead: `StopOnSignal` notices it at the end of the optimizer step in progress,
every rank agrees on it at that same step, the Lightning resume file is written there (the same
point as the periodic saves, so a resume continues the same batches), and `Interrupted` then
carries the step up. A second signal while one is held stops at once; the resume file is then
the last one saved. Once the process is on its way out for a signal, later ones are ignored: they
would only cut the saving and the report short (SIGKILL still ends a process stuck there).

Lightning has a SIGTERM handler of its own for the fit loop: it sets `trainer.received_sigterm`,
and the loops then raise `SIGTERMException` (a `SystemExit` with status 0, which reads as success)
at the end of a step or in the middle of validation, without a resume file; under DDP it also
issues a broadcast from inside the handler on rank 0 alone. The trainer installs it just before
the loop starts, so `StopOnSignal.on_train_start` (moe/train/stages.py) puts ours back with
`hold()`; the trainer's teardown restores the handlers it found (ours). A `SIGTERMException`
that still escapes (a signal landing in that instant) is reported as the interruption it is.

Only the standard library is imported here: `moe` enters `handled()` for every command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal ended the command. A BaseException, like KeyboardInterrupt: no `except
    Exception` on the way up swallows it. `step`: the step of the resume file written for it
    (None when none was, e.g. outside training); `run`: the run directory it belongs to."""

    def __init__(self, signum: int, step: int | None = None, run: Path | None = None):
        super().__init__(signum)
        _HANDLER.stopping = True
        self.signum = int(signum)
        self.step = step
        self.run = run

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"interrupted by {self.name}{at}"


class _Handler:
    """The one handler for both signals. `holding`: keep the first signal in `pending` for the
    training loop to act on; otherwise (or for a second one) raise `Interrupted` at once.
    `stopping`: an `Interrupted` exists, the process is on its way out."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.holding = False
        self.pending: int | None = None
        self.stopping = False
        self.depth = 0  # nested handled() blocks

    def install(self) -> None:
        self.pid = os.getpid()
        for s in SIGNALS:
            signal.signal(s, self)

    def __call__(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            # a forked child (a DataLoader worker) left to its parent, which decides and shuts it
            # down: Ctrl-C reaches the whole process group, so SIGINT is ignored here, and
            # SIGTERM ends it as it did before this handler existed
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.stopping:
            return
        if self.holding and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum)


_HANDLER = _Handler()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` inside this block; the previous handlers are put
    back after it. Signals reach only the main thread, so elsewhere this does nothing."""
    if not _main_thread():
        yield
        return
    if _HANDLER.depth == 0:
        _HANDLER.stopping = False  # a new command (or, called as a library, a new stage)
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _HANDLER.install()
    _HANDLER.depth += 1
    try:
        yield
    finally:
        _HANDLER.depth -= 1
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred(run: Path) -> Iterator[None]:
    """Hold the first SIGTERM/SIGINT inside this block (a training stage writing into the run
    directory `run`, which every `Interrupted` from it names) for `StopOnSignal`.

    A signal still held when the block ends (it came after the last step) is raised then. An
    error that escapes while one is held (a DataLoader worker the signal ended, Lightning's own
    SIGTERMException) is reported as the interruption it follows from.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    with handled():
        prev, _HANDLER.holding, _HANDLER.pending = _HANDLER.holding, True, None
        try:
            try:
                yield
            except Interrupted:
                raise
            except SIGTERMException:
                raise Interrupted(_HANDLER.pending or signal.SIGTERM) from None
            except Exception as e:
                if _HANDLER.pending is None:
                    raise
                raise Interrupted(_HANDLER.pending) from e
            finally:
                held, _HANDLER.pending = _HANDLER.pending, None
                _HANDLER.holding = prev
            if held is not None:
                raise Interrupted(held)
        except Interrupted as e:
            e.run = e.run or run
            raise


def pending() -> int | None:
    """The signal held by `deferred()`, if one came."""
    return _HANDLER.pending


def hold() -> None:
    """Install the handler, holding the first signal (the training loop's start: Lightning has
    just installed its own SIGTERM handler there; a ddp_spawn worker never ran `deferred()`)."""
    if _main_thread():
        _HANDLER.install()
        _HANDLER.holding = True
