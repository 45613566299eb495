"""lm-evaluation-harness over moe-forge checkpoints (needs `pip install 'moe-forge[lmeval]'`).

    from moe.eval import harness
    results = harness.run_tasks("runs/x", ["my_task"], include_path="my_tasks/", domain=None,
                                batch_size=8, limit=None, device="cpu")
    results["results"]["my_task"]          # lm-eval's metrics, e.g. {"acc,none": 0.4, ...}

    # or lm-eval's own API, once the model is registered:
    harness.register()                      # lm-eval now knows model="moe-forge"
    lm_eval.simple_evaluate(model="moe-forge", model_args="pretrained=runs/x,domain=code", ...)
    lm_eval.simple_evaluate(model=harness.MoEForgeLM(pretrained="runs/x"), ...)

The model (`MoEForgeLM`, moe/eval/harness_lm.py) follows lm-eval's Hugging Face model exactly,
so a checkpoint scores what its `moe export` scores under `--model hf`. This module imports
lm-eval only when it is used: without it, `harness.MoEForgeLM`, `register()` and `run_tasks()`
raise the one-line ConfigError `LMEVAL_MISSING`.

Tasks are lm-eval task names or YAML files; `include_path` adds a directory of task YAMLs (those
are looked up first, without indexing lm-eval's thousands of built-in tasks, which are read only
when a name is not found there). A task's dataset must be reachable: built-in tasks download
theirs from the Hugging Face Hub unless they are cached; offline local tasks use
`dataset_path: json` with `dataset_kwargs: {data_files: ...}` (a relative data_files path is
read from the current directory, as `datasets` reads it). Examples: tests/data/lm_eval_tasks/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe.config import ConfigError

LMEVAL_MISSING = "lm-eval is not installed (pip install 'moe-forge[lmeval]')"
MAX_LISTED = 20  # list the local tasks in an unknown-task error when there are at most this many


def require_lm_eval() -> None:
    """The one-line ConfigError when lm-eval cannot be imported."""
    try:
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise ConfigError(LMEVAL_MISSING) from None


def register() -> type:
    """Register the "moe-forge" model with lm-eval (once) and return its class."""
    require_lm_eval()
    from moe.eval.harness_lm import MoEForgeLM

    return MoEForgeLM


def __getattr__(name: str) -> Any:
    if name == "MoEForgeLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _local_tasks(include_path: str | os.PathLike) -> Any:
    """A TaskManager over `include_path` alone (fast: lm-eval's built-in tasks not indexed)."""
    from lm_eval.tasks import TaskManager

    p = Path(include_path)
    if not p.is_dir():
        raise ConfigError(f"--include-path {p}: no such directory (a folder of lm-eval task YAMLs)")
    return TaskManager(include_path=str(p), include_defaults=False)


def _unknown(names: list[str], manager: Any) -> list[str]:
    """The task names neither `manager` knows nor name an existing YAML file."""
    known = set(manager.all_tasks)
    out = []
    for name in names:
        if name in known or Path(name).is_file():
            continue
        if any(c in name for c in "*?[") and manager.match_tasks([name]):
            continue
        out.append(name)
    return out


def task_manager(tasks: list[str], include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's TaskManager for `tasks`; a one-line ConfigError naming any task it does not know
    (and the local tasks, when there are few)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("no lm-eval task given")
    local = None
    if include_path is not None:
        local = _local_tasks(include_path)
        if not _unknown(tasks, local):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = _unknown(tasks, manager)
    if not missing:
        return manager
    what = ", ".join(repr(t) for t in missing)
    msg = f"unknown lm-eval task{'s' if len(missing) > 1 else ''} {what}"
    if local is not None:
        mine = sorted(local.all_tasks)
        if not mine:
            msg += f"; {include_path} holds no task YAML"
        elif len(mine) <= MAX_LISTED:
            msg += f"; tasks in {include_path}: {', '.join(mine)}"
        else:
            msg += f"; {include_path} holds {len(mine)} tasks (none of that name)"
    else:
        msg += " (give --include-path DIR for a folder of your own task YAMLs)"
    raise ConfigError(msg)


def json_safe(results: dict) -> dict:
    """lm-eval's results made plain JSON (what its own result files hold: functions, numpy
    values and other objects in task configs become strings or lists)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def run_tasks(
    checkpoint: str | os.PathLike,
    tasks: list[str],
    include_path: str | os.PathLike | None = None,
    domain: str | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    device: str | None = None,
    *,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
    model_args: dict[str, Any] | None = None,
) -> dict:
    """Run lm-eval `tasks` on a moe-forge checkpoint (or run directory) through
    `lm_eval.simple_evaluate`; returns lm-eval's results dict as plain JSON ("results",
    "configs", "versions", "n-shot", ..., and "samples" with `log_samples`: every request with
    the model's responses).

    domain: the expert of a domain-routed MoE. limit: at most this many documents per task.
    model_args: more MoEForgeLM arguments (max_length, dtype, add_bos_token, ...).
    Raises ConfigError (one line) for lm-eval missing, an unknown task or a bad checkpoint."""
    cls = register()
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    manager = task_manager(list(tasks), include_path)
    args = {"pretrained": str(checkpoint), "domain": domain, "batch_size": batch_size,
            "device": device, **(model_args or {})}  # fmt: skip
    lm = cls(**args)
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        batch_size=batch_size, device=str(lm.device), log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )  # fmt: skip
    if results is None:  # not the rank that reports (never in one process)
        return {}
    results.setdefault("config", {}).update(
        model="moe-forge", model_args={k: v for k, v in args.items() if v is not None}
    )
    return json_safe(results)


def format_results(results: dict) -> str:
    """lm-eval's own markdown table of a `run_tasks` result (its groups' table below), with a
    line saying when `limit` made it a sample."""
    from lm_eval.utils import make_table

    out = [make_table(results)]
    if results.get("groups"):
        out.append(make_table(results, "groups"))
    limit = (results.get("config") or {}).get("limit")
    if limit:
        out.append(f"a sample: at most {limit} documents per task (--limit)")
    return "\n".join(out)
