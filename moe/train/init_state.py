"""Starting a run's AdamW from a saved state instead of zero moments (`optim.init_state`).

The file holds {parameter name: {exp_avg, exp_avg_sq, step}}; moe.surgery.optim_state writes
one for an assembled MoE from its branches' runs. `read_adam_state` checks its layout,
`load_adam_state` puts it into a fresh optimizer (moe.train.module.LitLM does, for a run that is
neither a resume nor a fork).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe.config import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")

PathLike = str | os.PathLike


def torch_load(path: Path, what: str) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # not the zip layout mmap needs
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"{what}: {path} is not a readable torch file ({first})") from None


def shape_of(t: torch.Tensor | tuple) -> list[int]:
    return list(t.shape if isinstance(t, torch.Tensor) else t)


def read_adam_state(path: PathLike, what: str = "optim.init_state") -> dict[str, dict]:
    """The file `write_moe_adam_state` wrote, checked for its layout (one-line ConfigErrors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{what}: no optimizer state file at {p} (write one with "
            "moe.surgery.optim_state.write_moe_adam_state)"
        )
    obj = torch_load(p, what)
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{what}: {p} does not hold {{parameter name: AdamW state}}")
    for name, st in obj.items():
        if not isinstance(st, dict) or any(
            not isinstance(st.get(k), torch.Tensor) for k in (*MOMENTS, "step")
        ):
            raise ConfigError(
                f"{what}: {p}: the entry {name!r} is not {{exp_avg, exp_avg_sq, step}} tensors"
            )
    return obj


def check_adam_state(
    model: torch.nn.Module, state: dict[str, dict], what: str = "optim.init_state"
) -> None:
    """Every parameter of `model` has an entry of its shape in `state`, and `state` names no
    other parameter."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(
            f"{what}: no AdamW state for {missing[0]}{more}; the file was made for another model"
        )
    extra = [n for n in state if n not in params]
    if extra:
        raise ConfigError(
            f"{what}: the file has state for {extra[0]}, which this model does "
            "not have; it was made for another model"
        )
    for name, p in params.items():
        for k in MOMENTS:
            if tuple(state[name][k].shape) != tuple(p.shape):
                raise ConfigError(
                    f"{what}: {k} of {name} is {shape_of(state[name][k])}, the "
                    f"parameter is {shape_of(p)}"
                )


def load_adam_state(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    state: dict[str, dict],
    what: str = "optim.init_state",
) -> None:
    """Set `optimizer.state[p]` of every parameter of `model` from `state` (by name; moments
    copied onto the parameter's device and dtype). The optimizer's hyper-parameters and LR
    schedule are untouched: only AdamW's moments and step count carry over."""
    check_adam_state(model, state, what)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for name, p in model.named_parameters():
        g = group_of.get(id(p))
        if g is None:
            raise ConfigError(f"{what}: parameter {name} is not in the optimizer")
        st = state[name]
        on_device = g.get("capturable") or g.get("fused")
        new = {
            "step": torch.tensor(
                float(st["step"]), dtype=scalar, device=p.device if on_device else "cpu"
            ),
            "exp_avg": torch.empty_like(p, memory_format=torch.preserve_format).copy_(
                st["exp_avg"]
            ),
            "exp_avg_sq": torch.empty_like(p, memory_format=torch.preserve_format).copy_(
                st["exp_avg_sq"]
            ),
        }
        if g.get("amsgrad"):
            new["max_exp_avg_sq"] = new["exp_avg_sq"].clone()
        optimizer.state[p] = new
