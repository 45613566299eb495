"""`moe run --jobs N` / `moe sweep --jobs N`: a study's independent work in up to N processes.

- several seeds (`run_seeds`): each seed's whole study in a worker, as `run_study` runs it one
  after another; the results come back in seed order, so the aggregate is the sequential one;
- one seed (`run_stages`): the unfinished training stages whose dependencies are built train in
  workers, each as `Study(recipe, run_dir).run(only=stage)`; the other stages (split, merge) run
  here as soon as theirs are, and evaluation and the report after all of them, as without --jobs.

Workers are spawned (never forked: torch and Lightning do not survive a fork with threads), share
the CPU threads (`torch.set_num_threads(threads // N)`), and prefix every line they print with
their seed or stage (`[seed 1235] ...`); their progress bars are off. Each runs in its own process
group, so a Ctrl-C reaches this process alone, which passes the signal on once to every running
worker: each stops at the end of its step in progress with its resume file written, as a single
process does, and a re-run continues every stage from there. A worker whose parent died stops the
same way. The first error in a worker stops the others the same way (pending work is cancelled)
and is raised here: a ConfigError is the same one-line error as without --jobs.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from moe.config import ConfigError, Recipe

# ----------------------------------------------------------------------------- in the worker


class _Prefixed:
    """A text stream that writes each whole line to `raw` with `prefix` before it."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.prefix = ""
        self._buf = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            *lines, self._buf = self._buf.replace("\r", "\n").split("\n")
            if lines:
                self.raw.write("".join(f"{self.prefix}{ln}\n" for ln in lines if ln.strip()))
                self.raw.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buf.strip():
                self.raw.write(f"{self.prefix}{self._buf}\n")
            self._buf = ""
            self.raw.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.raw.fileno()

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


_OUT: list[_Prefixed] = []
_STOP: list[int] = []  # a stop signal that came between tasks: the next task stops at once


def _note(signum: int, frame) -> None:
    _STOP.append(signum)


def _init_worker(threads: int, filters: list, levels: dict[str, int], parent: int) -> None:
    """A worker's setup, once: its own process group (the terminal's Ctrl-C goes to the parent,
    which passes it on), its share of the threads, the parent's warning filters and log levels
    (the `moe` command quiets Lightning's banners), and line prefixes on stdout and stderr."""
    os.setpgrp()
    for s in (signal.SIGINT, signal.SIGTERM):  # between tasks; a task handles both (`_task`)
        signal.signal(s, _note)
    # before any import: a log handler made at import time keeps the stream it found
    _OUT[:] = [_Prefixed(sys.stdout), _Prefixed(sys.stderr)]
    sys.stdout, sys.stderr = _OUT
    with contextlib.suppress(Exception):
        warnings.filters[:] = filters
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    import torch

    import moe.experiments.study.runner  # noqa: F401 (what every task needs: all workers import
    import moe.train.stages  # noqa: F401  it at once, before their first task)

    torch.set_num_threads(max(1, threads))

    def watch() -> None:  # the parent died (SIGKILL): stop at a resumable point, as for Ctrl-C
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _ready() -> int:
    return os.getpid()


@contextlib.contextmanager
def _task(prefix: str) -> Iterator[None]:
    """One task in a worker: its lines prefixed, SIGINT/SIGTERM stop it at a resumable point
    (`moe.train.signals.handled`), a ConfigError comes back to the parent whole."""
    from moe.train.signals import Interrupted, handled

    for out in _OUT:
        out.prefix = prefix
    try:
        with handled():
            if _STOP:  # before handled() took the signals over
                raise Interrupted(_STOP[0])
            yield
    except ConfigError as e:
        raise _picklable(e) from None
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise
    finally:
        for out in _OUT:
            out.flush()


def _picklable(e: ConfigError) -> ConfigError:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return ConfigError(str(e))


def _quiet(recipe: Recipe) -> Recipe:
    """Progress bars of several processes would overwrite each other; they change no result."""
    return dataclasses.replace(
        recipe, trainer=dataclasses.replace(recipe.trainer, enable_progress_bar=False)
    )


def _run_seed(sub: Recipe, command: str) -> dict:
    """One seed's whole study, as `run_study` runs it without --jobs."""
    with _task(f"[seed {sub.seed}] "):
        from moe.experiments.study.runner import Study
        from moe.io.checkpoint import write_json

        res = Study(_quiet(sub), Path(sub.out_dir)).run()
        res["command"] = command
        write_json(Path(sub.out_dir) / "results.json", res)
        return res


def _run_stage(recipe: Recipe, run_dir: str, name: str) -> str:
    """One unfinished stage of a study whose dependencies are built."""
    with _task(f"[{name}] "):
        from moe.experiments.study.runner import Study

        Study(_quiet(recipe), Path(run_dir)).run(only=name, quiet_later=True)
        return name


# ----------------------------------------------------------------------------- in the parent


@contextlib.contextmanager
def _pool(workers: int, threads: int, run_dir: Path) -> Iterator[cf.ProcessPoolExecutor]:
    """A pool of `workers` spawned processes. Leaving it on an error or a signal cancels the work
    not started, passes the signal (else SIGTERM) on to every running worker, and waits for them
    to stop at their resumable points; the error is raised after that (an interruption names
    `run_dir`, for the resume hint)."""
    levels = {n: lg.level for n, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}  # fmt: skip
    try:
        filters = list(warnings.filters)
        pickle.dumps(filters)
    except Exception:
        filters = []
    ex = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(threads, filters, levels, os.getpid()),
    )
    try:
        for _ in range(workers):  # start every worker now: their imports overlap
            ex.submit(_ready)
        yield ex
    except BaseException as e:
        signum = getattr(e, "signum", signal.SIGTERM)
        for f in getattr(ex, "_pending_work_items", {}).values():
            f.future.cancel()
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, ValueError):
                if p.is_alive():
                    os.kill(p.pid, signum)
        from moe.train.signals import Interrupted

        if isinstance(e, Interrupted) and e.run is None:
            e.run = run_dir
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _wait(futures: set[cf.Future]) -> set[cf.Future]:
    """The finished ones among `futures` (at least one); the first error among them raised."""
    while True:
        done, _ = cf.wait(futures, timeout=1.0, return_when=cf.FIRST_COMPLETED)
        if done:
            for f in done:
                f.result()  # raises the worker's error
            return done


def run_seeds(subs: list[Recipe], command: str, jobs: int, run_dir: Path) -> list[dict]:
    """Every seed's study (`subs`, one recipe per seed) in up to `jobs` processes; their
    results.json written as without --jobs, the results returned in seed order."""
    import torch

    from moe.experiments.study.context import log

    workers = min(jobs, len(subs))
    threads = max(1, torch.get_num_threads() // workers)
    log(f"== seeds {', '.join(str(s.seed) for s in subs)} in {workers} processes "
        f"({threads} thread(s) each)")
    with _pool(workers, threads, run_dir) as ex:
        futures = {ex.submit(_run_seed, s, command): k for k, s in enumerate(subs)}
        results: list[dict | None] = [None] * len(subs)
        todo = set(futures)
        while todo:
            for f in _wait(todo):
                todo.discard(f)
                k = futures[f]
                results[k] = f.result()
                log(f"== seed {subs[k].seed} done ({len(subs) - len(todo)}/{len(subs)})")
    return [r for r in results if r is not None]


def _width(todo: list) -> int:
    """How many of these training stages (StageSpecs, dependencies first) could run at once: the
    most at one depth of the dependencies, and at least 2 when two need not wait for each other."""
    depth: dict[str, int] = {}
    above: dict[str, set[str]] = {}
    for st in todo:
        depth[st.name] = 1 + max((depth.get(d, 0) for d in st.deps), default=0)
        above[st.name] = set(st.deps).union(*(above.get(d, set()) for d in st.deps))
    train = [st.name for st in todo if st.kind == "train"]
    width = max(collections.Counter(depth[n] for n in train).values(), default=0)
    if width < 2 and any(a not in above[b] and b not in above[a]
                         for i, a in enumerate(train) for b in train[i + 1:]):
        width = 2
    return width


def run_stages(recipe: Recipe, run_dir: Path, jobs: int) -> None:
    """Build every unfinished stage of one study: training stages whose dependencies are built
    in up to `jobs` processes, the others here, each as soon as its dependencies are."""
    import torch

    from moe.experiments.study.context import log
    from moe.experiments.study.runner import Study

    study = Study(recipe, run_dir)
    stages = study.plan()
    built = {st.name for st in stages if study.ctx.done(st.name)}
    todo = [st for st in stages if st.name not in built]
    workers = min(jobs, _width(todo))
    if workers < 2:  # nothing to train side by side: the study trains them in this process
        return
    threads = max(1, torch.get_num_threads() // workers)
    log(f"== up to {workers} training stages at once ({threads} thread(s) each)")
    with _pool(workers, threads, run_dir) as ex:
        running: dict[cf.Future, str] = {}
        while todo or running:
            for st in list(todo):  # in plan order: a stage's dependencies come before it
                if not all(d in built for d in st.deps):
                    continue
                if st.kind != "train":  # split, merge: short, here
                    study.run(only=st.name, quiet_later=True)
                    built.add(st.name)
                elif len(running) < workers:
                    running[ex.submit(_run_stage, recipe, str(run_dir), st.name)] = st.name
                else:
                    continue
                todo.remove(st)
            if not running:
                if todo:  # the plan orders dependencies first: cannot happen
                    raise ConfigError(f"stage {todo[0].name} cannot be built: its dependencies "
                                      "are not")  # fmt: skip
                break
            for f in _wait(set(running)):
                built.add(running.pop(f))
