"""One rule for every command that writes (issue #23): claim the output before touching it.

`claim(outputs, inputs)` is entered before a command changes anything on disk and held until its
outputs are renamed into place:

1. no output is, or lies inside, one of the command's inputs, and no input lies inside an output
   (which the command would replace): resolved paths are compared (symlinks followed, hard links
   by inode), and a conflict is refused in one line naming both. A moe-forge checkpoint (or a
   run directory holding one at `model/`) stands for the files a load reads (`reads`), so a
   result file beside them (`moe eval`'s eval.json) is allowed and `--json CK/meta.json` is not;
2. each output is locked: an exclusive non-blocking flock on `.NAME.lock` beside it, outside the
   output so that nothing is created in it before the lock is held and the lock survives the
   output being renamed or deleted. A second writer is refused with `OUT is in use by another
   job (pid N)`. The lock file is removed on release; a killed holder's flock dies with it and
   its leftover file is simply reused;
3. the writes themselves go through a staging name and a rename (`save_checkpoint`,
   `atomic_write_text`, `write_json`, `replace_dir`, `write_delta`): this module writes nothing.

Errors are ConfigErrors: the CLI prints one line `moe: error: ...` and exits 2.

A command that holds a claim may call another writer of the same output (shrink's healing
stage trains into the directory shrink claimed): claiming a path this process already holds
through `claim` is free. A lock taken directly with `OutputLock` (as tests do, standing in for
another job) is not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe.config import ConfigError

PathLike = str | os.PathLike


class OutputError(ConfigError):
    """An output would damage one of the inputs, or is named twice."""


class OutputInUseError(OutputError):
    """Another job holds the output's lock."""


def lock_path(out: PathLike) -> Path:
    """The lock file of output `out`: `.NAME.lock` beside it (in its resolved parent)."""
    p = Path(out).resolve()
    return p.parent / f".{p.name}.lock"


def _make_dirs(d: Path) -> list[Path]:
    """mkdir -p `d`; returns the directories created, deepest first."""
    made = []
    while not d.exists():
        made.append(d)
        d = d.parent
    for m in reversed(made):
        m.mkdir(exist_ok=True)
    return made


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


class OutputLock:
    """An exclusive flock on `.NAME.lock` beside `out`; a second holder is refused at once."""

    def __init__(self, out: PathLike):
        self.out = str(out)
        self.path = lock_path(out)
        self.fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> OutputLock:
        try:
            self._made = _make_dirs(self.path.parent)
        except OSError as e:
            raise OutputError(f"cannot write {self.out}: {e.strerror} ({e.filename})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                _remove_empty(self._made)
                raise OutputError(f"cannot write {self.out}: {e.strerror} ({self.path.parent})"
                                  ) from None  # fmt: skip
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                _remove_empty(self._made)
                raise OutputInUseError(
                    f"{self.out} is in use by another job (pid {holder}); wait for it or choose "
                    "another output"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            # the holder released and removed the file between our open and flock: again
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # removed while still held: a writer that opened it meanwhile sees another inode, retries
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        _remove_empty(self._made)  # directories made for a command that wrote nothing

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def reads(path: PathLike) -> list[Path]:
    """What a command reads at `path`: a moe-forge checkpoint's files (also for a run directory
    holding one at model/), else `path` itself (a file, an HF directory, a delta ...)."""
    from moe.io.checkpoint import CONFIG, META, WEIGHTS, is_checkpoint

    p = Path(path)
    for c in (p, p / "model"):
        if is_checkpoint(c):
            return [c / WEIGHTS, c / CONFIG, c / META, c / "tokenizer"]
    return [p]


def recipe_inputs(recipe: Any) -> list[str]:
    """The paths a training recipe reads besides its run directory: init, init_from, the
    tokenizer and local data files (`resume` is the run's own state; the Lightning file `fork`
    names is found by the caller)."""
    out = [recipe.init, recipe.init_from]
    tok = recipe.data.tokenizer
    if tok and tok != "byte" and Path(tok).exists():
        out.append(tok)
    for src in recipe.data.sources.values():
        out += [p for p in src.paths if Path(p).exists()]
    return [p for p in out if p]


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """Refuse an output that is, or lies inside, an input; an input inside an output; an output
    named twice. Reads nothing but the paths' names (and inodes of existing files)."""
    ins = [(str(f), f.resolve()) for i in inputs if i is not None for f in reads(i)]
    seen: dict[Path, str] = {}
    for o in outputs:
        if o is None:
            continue
        shown, out = str(o), Path(o).resolve()
        if out in seen:
            raise OutputError(f"output {shown} is named twice (as {seen[out]} and {shown})")
        seen[out] = shown
        for ishown, inp in ins:
            if _same(out, inp):
                raise OutputError(f"output {shown} is the input {ishown}; choose another output")
            if inp in out.parents:
                raise OutputError(f"output {shown} lies inside the input {ishown}; choose "
                                  "another output")  # fmt: skip
            if out in inp.parents:
                raise OutputError(f"input {ishown} lies inside the output {shown}, which this "
                                  "command writes; choose another output")  # fmt: skip


_HELD: set[Path] = set()  # outputs this process holds through `claim`


@contextlib.contextmanager
def claim(
    outputs: PathLike | Iterable[PathLike | None] | None,
    inputs: Iterable[PathLike | None] = (),
    writes: Iterable[PathLike | None] | None = None,
) -> Iterator[None]:
    """Check `outputs` against `inputs`, then lock each output until the block ends (see the
    module docstring). `writes`: what is replaced, when that is not the whole locked output (a
    run directory's model/, logs/, resume/, recipe.yaml)."""
    if outputs is None or isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    outs = [Path(o) for o in outputs if o is not None]
    check_outputs(outs if writes is None else writes, inputs)
    with contextlib.ExitStack() as stack:
        for o in outs:
            key = o.resolve()
            if key in _HELD:
                continue  # this command's own claim, further up
            stack.enter_context(OutputLock(o))
            _HELD.add(key)
            stack.callback(_HELD.discard, key)
        yield
