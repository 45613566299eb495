"""The plain PyTorch training step loop (no Lightning): prune healing (moe/surgery/prune.py), the
experiments' runs (moe/experiments/init/study.py `train_loop`) and the fleet's replicas
(moe/experiments/fleet/fleet.py) all train through `train_steps`.

It computes what `LitLM` computes for `moe train`: the same model call (the `domain` router
given each sequence's expert), the same chunked loss (moe.model.loss.linear_cross_entropy), the
same AdamW parameter groups and LR schedule (`make_optimizer`), gradient clipping by norm. Unlike
`LitLM.training_step` it does not add the router's auxiliary loss, and it never takes a step on a
non-finite loss: it stops there and says so (`Steps.diverged_at`); callers decide whether that
is an error. The batches stay where they are made (the model's device is the CPU in every
caller); a batch on another device than the model is moved to the model's.

    opt, sched = make_optimizer(model, optim, steps)        # trainable set, AdamW, schedule
    done = train_steps(model, opt, batches, steps, sched=sched, domain_names=names,
                       grad_clip=optim.grad_clip)
    if done.diverged_at is not None: ...
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moe.config import OptimConfig
from moe.model.loss import linear_cross_entropy
from moe.model.moe_layer import domain_to_expert, update_router_biases
from moe.model.transformer import IGNORE_INDEX, Transformer
from moe.train.schedule import adamw_with_schedule


def set_trainable(model: Transformer, which: str) -> None:
    """all | router (only routers) | ffn (FFN and expert weights, shared expert included, no
    router) | moe (ffn and the routers) | experts (only the routed experts of MoE layers) |
    embeddings (the token embedding and the output head). The same choice as
    `LitLM.set_trainable`."""
    for name, p in model.named_parameters():
        if which == "all":
            p.requires_grad_(True)
        elif which == "router":
            p.requires_grad_(".router." in name)
        elif which == "ffn":
            p.requires_grad_(".ffn." in name and ".router." not in name)
        elif which == "moe":  # every FFN layer whole, routers included; the rest frozen
            p.requires_grad_(".ffn." in name)
        elif which == "experts":
            # MoEFFN keeps its experts as (E, ...) tensors named ffn.w1/w3/w2 (no .weight)
            p.requires_grad_(name.endswith((".ffn.w1", ".ffn.w3", ".ffn.w2")))
        elif which == "embeddings":  # a retokenized model's new embeddings, body frozen
            p.requires_grad_(name in ("tok_emb.weight", "lm_head.weight"))
        else:
            raise ValueError(f"unknown trainable set {which!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"trainable={which!r} leaves no parameter to train in this model")


def make_optimizer(model: Transformer, optim: OptimConfig, total_steps: int, start: int = 0,
                   trainable: str = "all"
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:  # fmt: skip
    """Set which parameters train (`set_trainable`), then AdamW and its LR schedule as
    `moe train` makes them (moe.train.schedule.adamw_with_schedule)."""
    set_trainable(model, trainable)
    return adamw_with_schedule(model, optim, total_steps, start)


def expert_table(model: Transformer, domain_names: Sequence[str] | None) -> torch.Tensor | None:
    """Domain id -> expert index (-1: none) for a `domain`-routed MoE, else None."""
    c = model.config
    if not c.moe.experts or c.moe.router != "domain":
        return None
    if domain_names is None:
        raise ValueError("a model with router=domain needs the data's domain_names to train")
    return domain_to_expert(list(domain_names), list(c.moe.experts))


def lm_loss(model: Transformer, batch: dict, table: torch.Tensor | None = None,
            domain_names: Sequence[str] = ()) -> tuple:  # fmt: skip
    """(summed loss with its gradient, per-token losses (B, L), target mask (B, L), the model's
    output): `LitLM.forward`. `table`: `expert_table`'s, for a domain-routed MoE."""
    hint = None
    if table is not None:
        hint = table[batch["domain"]]
        if (hint < 0).any():
            missing = sorted({domain_names[int(d)] for d in batch["domain"][hint < 0]})
            raise ValueError(f"domain(s) {', '.join(missing)} have no expert in this model")
    out = model(batch["input_ids"], domain=hint, return_hidden=True)
    tgt = batch["targets"]
    total, loss_BL = linear_cross_entropy(out.hidden, model.head_weight, tgt)
    return total, loss_BL, (tgt != IGNORE_INDEX), out


@dataclass
class Steps:
    """What `train_steps` did."""

    losses: list[float] = field(default_factory=list)  # each taken step's mean token loss
    diverged_at: int | None = None  # the step whose loss was not finite (no update applied)
    bad_loss: float | None = None  # that loss


def train_steps(
    model: Transformer,
    opt: torch.optim.Optimizer,
    batches,
    steps: int,
    *,
    sched=None,
    domain_names: Sequence[str] | None = None,
    grad_clip: float = 0.0,
    start: int = 0,
    on_step: Callable[[int], None] | None = None,
    progress: str | None = None,
) -> Steps:
    """Train `steps` steps, numbered start .. start + steps - 1: for each, `on_step(i)` (before
    the step: evaluations), batch i (`batches.batch(i)`, or `batches(i)` for a callable), the
    mean token loss, zero_grad, backward, the gradient norm of the trainable parameters clipped
    to `grad_clip` (0: no clipping), `opt.step()`, `sched.step()`. Stops at a non-finite loss
    without updating. The model is left in training mode. `progress`: a progress bar's label
    (None: no bar)."""
    from tqdm import tqdm

    get = batches.batch if hasattr(batches, "batch") else batches
    names = list(domain_names) if domain_names is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    table = expert_table(model, names)
    if table is not None:
        table = table.to(device)
    model.train()
    done = Steps()
    for i in tqdm(range(start, start + steps), desc=progress, leave=False,
                  disable=progress is None, file=sys.stderr):  # fmt: skip
        if on_step is not None:
            on_step(i)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in get(i).items()}
        loss_sum, _, mask, _ = lm_loss(model, batch, table, names or ())
        loss = loss_sum / mask.sum().clamp(min=1)
        if not torch.isfinite(loss):
            done.diverged_at, done.bad_loss = i, float(loss.detach())
            return done
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        update_router_biases(model)  # aux-free balancing biases, where the model has them
        if sched is not None:
            sched.step()
        done.losses.append(float(loss.detach()))
    return done
