"""AdamW state for an assembled MoE, made from its branches' training runs (BTX continuing the
optimizer instead of starting the MoE's fine-tune from zero moments).

`moe_adam_state` maps the AdamW moments of the branches' Lightning checkpoints
(`<stage>/resume/last.ckpt`) onto the parameters of the MoE that `assemble_checkpoints` built
from their models (`<stage>/model`), exactly as assembly maps the weights
(moe.model.split.assemble):

    expert e            layers.{i}.ffn.w1[e] = branch e's layers.{i}.ffn.w1.weight[Fs:].T, w3 alike,
                        w2[e] = its w2.weight[:, Fs:].T (Fs: the shared expert's neurons, 0
                        without one); the generalist expert (the seed's FFN) is the last one
    shared expert       layers.{i}.ffn.shared.{w1,w3,w2}.weight: the mean over the branches (and
                        the generalist) of their first Fs neurons
    shared weights      everything outside the FFNs: the mean over the branches (and the
                        generalist, which assembly averages in too) with shared="average", the
                        base checkpoint's with shared="base"
    router              no counterpart: zero moments, step 0

The optimizer state of a Lightning checkpoint is indexed by position; positions are read back to
names with `moe.train.schedule.param_groups_by_name` (the rule `adamw_with_schedule` built the
groups with) applied to the dense model that the run's `model/` config describes.

The file `write_moe_adam_state` writes ({name: {exp_avg, exp_avg_sq, step}}) is what a recipe's
`optim.init_state` names; `moe.train.init_state` reads it and puts it into a fresh optimizer
(moe.train.module.LitLM does, for a run that is neither a resume nor a fork).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe.config import ASSEMBLE_SHARED, ConfigError, ModelConfig
from moe.io.checkpoint import read_config, read_meta, resolve_checkpoint, staged_file
from moe.io.output import claim
from moe.io.rundir import find_resume_ckpt
from moe.model.transformer import Transformer
from moe.train.init_state import MOMENTS, shape_of, torch_load
from moe.train.schedule import param_groups_by_name

FFN_WEIGHTS = ("w1", "w3", "w2")

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- reading a run


def _run_files(path: PathLike) -> tuple[Path, Path]:
    """(Lightning checkpoint, model directory) of a training run, given the checkpoint file
    (`<run>/resume/last.ckpt`) or the run directory."""
    p = Path(path)
    if p.is_dir():
        ckpt = find_resume_ckpt(p)
        run = p.parent if p.name == "resume" else p
    elif p.is_file():
        ckpt = p
        run = p.parent.parent if p.parent.name == "resume" else p.parent
    else:
        raise ConfigError(f"optimizer state: no Lightning checkpoint at {p}")
    try:
        model_dir = resolve_checkpoint(run)
    except ConfigError:
        raise ConfigError(
            f"optimizer state: {ckpt} has no model checkpoint beside it ({run / 'model'}), whose "
            "config names its parameters"
        ) from None
    return ckpt, model_dir


def _meta_model(cfg: ModelConfig) -> Transformer:
    """The model `cfg` describes, without storage: its parameters' names, order and shapes."""
    with torch.device("meta"):
        return Transformer(cfg)


def run_adam_state(path: PathLike) -> tuple[dict[str, dict], Transformer]:
    """A training run's AdamW state by parameter name ({name: {exp_avg, exp_avg_sq, step}},
    step a float) and its model (on the meta device: names and shapes). A parameter the run never
    updated (frozen) has no entry. `path`: `<run>/resume/last.ckpt` or the run directory."""
    ckpt, model_dir = _run_files(path)
    model = _meta_model(read_config(model_dir))
    ck = torch_load(ckpt, "optimizer state")
    opts = ck.get("optimizer_states") if isinstance(ck, dict) else None
    if not opts or not isinstance(opts[0], dict) or not opts[0].get("state"):
        raise ConfigError(
            f"optimizer state: {ckpt} holds no optimizer state (a Lightning "
            "checkpoint of `moe train` after at least one step is needed)"
        )
    state, groups = opts[0]["state"], opts[0].get("param_groups") or []
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    saved = {
        k.removeprefix("model."): tuple(v.shape)
        for k, v in (ck.get("state_dict") or {}).items()
        if k.startswith("model.")
    }
    if saved and saved != shapes:
        raise ConfigError(
            f"optimizer state: {ckpt} trained another model than the one at "
            f"{model_dir} (parameter names or shapes differ)"
        )
    names = param_groups_by_name(model)
    if [len(g.get("params", ())) for g in groups] != [len(n) for n in names]:
        raise ConfigError(
            f"optimizer state: {ckpt}'s optimizer has groups of "
            f"{[len(g.get('params', ())) for g in groups]} parameters, the model at {model_dir} "
            f"makes {[len(n) for n in names]} (decay, no_decay)"
        )
    out: dict[str, dict] = {}
    for group_names, g in zip(names, groups):
        for name, idx in zip(group_names, g["params"]):
            st = state.get(idx)
            if not st:
                continue  # never updated in that run
            if any(k not in st for k in (*MOMENTS, "step")):
                raise ConfigError(
                    f"optimizer state: {ckpt}: the state of {name} has no "
                    f"{'/'.join(MOMENTS)}/step (not AdamW's)"
                )
            for k in MOMENTS:
                if tuple(st[k].shape) != shapes[name]:
                    raise ConfigError(
                        f"optimizer state: {ckpt}: {k} of {name} is {shape_of(st[k])}, the "
                        f"parameter is {shape_of(shapes[name])} (a sharded optimizer state?)"
                    )
            out[name] = {
                "exp_avg": st["exp_avg"],
                "exp_avg_sq": st["exp_avg_sq"],
                "step": float(st["step"]),
            }
    return out, model


# ----------------------------------------------------------------------------- the MoE's state


class _Mean:
    """Running mean of moments (float64) and steps over the sources that have them."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0.0
        self.count = 0
        self.dtype = torch.float32

    def add(self, parts: dict[str, torch.Tensor], step: float) -> None:
        for k, t in parts.items():
            self.sums[k] = self.sums[k] + t.double() if k in self.sums else t.double().clone()
        if self.count == 0:
            self.dtype = parts["exp_avg"].dtype
        self.steps += step
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        out = {k: (s / self.count).to(self.dtype) for k, s in self.sums.items()}
        out["step"] = torch.tensor(self.steps / self.count, dtype=torch.float32)
        return out


def _ffn_part(t: torch.Tensor, weight: str, fs: int, expert: bool) -> torch.Tensor:
    """A dense FFN tensor's expert part in kernel layout (E-slice of MoEFFN.w1/w3/w2), or its
    shared-expert part (SwiGLU layout), as moe.model.split.assemble slices the weights."""
    if weight == "w2":  # (D, F)
        return t[:, fs:].T if expert else t[:, :fs]
    return t[fs:].T if expert else t[:fs]  # (F, D)


def moe_adam_state(
    branch_ckpts: list[Path],
    moe_model_dir: Path,
    experts: list[str],
    shared: str,
    base_ckpt: Path | None = None,
    generalist_ckpt: Path | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state for every parameter of the MoE at `moe_model_dir`, assembled (moe.surgery.
    experts.assemble_checkpoints) from the branches whose runs `branch_ckpts` name, in the order
    of `experts` (one name per branch; with `generalist_ckpt` the MoE's last expert is
    "generalist", the seed's FFN, and its moments come from that run).

    Returns {name: {"exp_avg", "exp_avg_sq", "step"}}, the moments in the dtype of the branches'
    (float32 under fp32 and mixed precision), "step" a float32 scalar tensor. Each branch path is
    a Lightning checkpoint `<stage>/resume/last.ckpt` (or the stage directory), with the stage's
    model at `<stage>/model`; `base_ckpt` likewise, for shared="base".

    Mapping: see the module docstring (expert slices copied exactly, transposed into the kernel
    layout; shared weights and the shared expert averaged in float64, or the base's; the router
    zero). A parameter a run never updated (frozen there) has no moments in it: means are over
    the runs that have them, and one that none has gets zero moments.

    Step: AdamW keeps a step count per parameter, used for bias correction. Each parameter gets
    the MEAN of the step counts of the states its moments came from (for an expert stack or an
    averaged weight the branches', for shared="base" the base's); branches of one study train
    equally long, so the mean is their common step. A parameter with zero moments (the router)
    gets step 0: AdamW then treats it exactly as a new parameter.

    Raises a one-line ConfigError when a run has no optimizer state, or its model does not fit
    the MoE (names, shapes, experts).
    """
    if shared not in ASSEMBLE_SHARED:
        raise ConfigError(
            f"optimizer state: shared must be {' or '.join(ASSEMBLE_SHARED)}, got {shared!r}"
        )
    if shared == "base" and base_ckpt is None:
        raise ConfigError(
            "optimizer state: shared=base needs base_ckpt (the base run's Lightning checkpoint)"
        )
    if len(branch_ckpts) != len(experts):
        raise ConfigError(
            f"optimizer state: {len(branch_ckpts)} branch checkpoints for "
            f"{len(experts)} experts {list(experts)}"
        )
    moe_dir = resolve_checkpoint(moe_model_dir)
    mcfg = read_config(moe_dir)
    names = list(experts) + (["generalist"] if generalist_ckpt is not None else [])
    if list(mcfg.moe.experts) != names:
        raise ConfigError(
            f"optimizer state: {moe_dir} has the experts {list(mcfg.moe.experts)}, not {names}"
        )
    made = (read_meta(moe_dir).get("assembled") or {}).get("shared")
    if made is not None and made != shared:
        raise ConfigError(
            f"optimizer state: {moe_dir} was assembled with shared={made}, not {shared}"
        )
    moe = _meta_model(mcfg)
    target = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    fs = mcfg.moe.shared_expert_ffn_dim

    out: dict[str, dict[str, torch.Tensor]] = {}
    expert_steps: dict[str, list[float]] = {}
    means: dict[str, _Mean] = {}
    sources = [Path(p) for p in branch_ckpts]
    if generalist_ckpt is not None:
        sources.append(Path(generalist_ckpt))
    for e, src in enumerate(sources):
        st, dense = run_adam_state(src)
        _check_dense(dense, target, src, moe_dir, fs)
        for name, s in st.items():
            if ".ffn." not in name:
                if shared == "average":
                    means.setdefault(name, _Mean()).add({k: s[k] for k in MOMENTS}, s["step"])
                continue
            stem, weight = name.rsplit(".", 2)[0], name.split(".")[-2]  # layers.i.ffn, w1
            moe_name = f"{stem}.{weight}"
            slot = out.setdefault(moe_name, {})
            for k in MOMENTS:
                part = _ffn_part(s[k], weight, fs, expert=True)
                if k not in slot:
                    slot[k] = torch.zeros(target[moe_name], dtype=part.dtype)
                slot[k][e] = part
            expert_steps.setdefault(moe_name, []).append(s["step"])
            if fs:
                means.setdefault(f"{stem}.shared.{weight}.weight", _Mean()).add(
                    {k: _ffn_part(s[k], weight, fs, expert=False) for k in MOMENTS}, s["step"]
                )
        del st
    for moe_name, steps in expert_steps.items():
        out[moe_name]["step"] = torch.tensor(sum(steps) / len(steps), dtype=torch.float32)
    for name, m in means.items():
        out[name] = m.result()
    if shared == "base":
        st, dense = run_adam_state(base_ckpt)
        _check_dense(dense, target, Path(base_ckpt), moe_dir, fs)
        for name, s in st.items():
            if ".ffn." not in name:
                out[name] = {k: s[k].clone() for k in MOMENTS}
                out[name]["step"] = torch.tensor(s["step"], dtype=torch.float32)
        del st

    result = {}
    for name, shape in target.items():  # every parameter, in the MoE's order
        got = out.get(name)
        if got is None:  # the router, or what no run updated
            got = {k: torch.zeros(shape) for k in MOMENTS}
            got["step"] = torch.tensor(0.0)
        for k in MOMENTS:
            if tuple(got[k].shape) != shape:
                raise ConfigError(
                    f"optimizer state: {k} of {name} came out {shape_of(got[k])}, "
                    f"the MoE's parameter is {shape_of(shape)}"
                )
            got[k] = got[k].contiguous()
        result[name] = got
    unplaced = sorted(set(out) - set(target))
    if unplaced:
        raise ConfigError(
            f"optimizer state: {unplaced[0]} of the runs has no place in the MoE at {moe_dir}"
        )
    return result


def _check_dense(
    dense: Transformer, target: dict[str, tuple], src: Path, moe_dir: Path, fs: int
) -> None:
    """The run's model is a dense model whose FFNs are the MoE's shared expert (`fs` neurons)
    plus one expert, and whose other parameters are the MoE's (names and shapes)."""
    if dense.config.moe.experts:
        raise ConfigError(f"optimizer state: {src} trained an MoE; branches are dense")
    shapes = {n: tuple(p.shape) for n, p in dense.named_parameters()}
    outside = {n: s for n, s in shapes.items() if ".ffn." not in n}
    want = {n: s for n, s in target.items() if ".ffn." not in n}
    if outside != want:
        n = next(
            (n for n in want if outside.get(n) != want[n]),
            next(iter(set(outside) - set(want)), "?"),
        )
        raise ConfigError(
            f"optimizer state: {src}'s model does not fit the MoE at {moe_dir} ({n} is "
            f"{shape_of(outside[n]) if n in outside else 'absent'} there, "
            f"{shape_of(want[n]) if n in want else 'absent'} in the MoE)"
        )
    for i in range(dense.config.n_layers):
        for w in FFN_WEIGHTS:
            d = shapes[f"layers.{i}.ffn.{w}.weight"]  # (F, D), w2 (D, F)
            e = target.get(f"layers.{i}.ffn.{w}", (0, 0, 0))[1:]  # (D, Fe), w2 (Fe, D)
            want = (fs + e[1], e[0]) if w != "w2" else (e[1], fs + e[0])
            if d != want:
                raise ConfigError(
                    f"optimizer state: {src}'s layers.{i}.ffn.{w}.weight is {shape_of(d)}; the "
                    f"MoE's experts {shape_of(e)} (shared expert {fs}) need {shape_of(want)}"
                )


def write_moe_adam_state(
    branch_ckpts: list[Path],
    moe_model_dir: Path,
    experts: list[str],
    shared: str,
    base_ckpt: Path | None = None,
    generalist_ckpt: Path | None = None,
    *,
    out: Path,
) -> Path:
    """`moe_adam_state(...)` saved to `out` with torch.save, atomically (a staging name renamed
    into place); the file a recipe's `optim.init_state` names. Returns `out`."""
    inputs = [*branch_ckpts, moe_model_dir, base_ckpt, generalist_ckpt]
    with claim(out, inputs):  # moe/io/output.py
        state = moe_adam_state(branch_ckpts, moe_model_dir, experts, shared, base_ckpt,
                               generalist_ckpt)  # fmt: skip
        with staged_file(out) as tmp:
            torch.save(state, tmp)
    return Path(out)
