"""Training stages as plain functions: `train(recipe)` runs one stage into one run directory.

Stages (recipe `stage:`):
    dense   a dense model (random init, or continued from `init`) on the recipe's stream
    branch  one expert's branch on its own domain only: `init` is an MoE checkpoint (from
            `moe split`) whose shared weights + expert `branch.domain` become a dense model, or a
            dense checkpoint trained as is; the stream is forced to that single domain
    joint   an MoE (from `init`, or random) trained in one job; with router=domain every token goes
            to its domain's expert, batches composed per domain
    router  fine-tune the learned router(s) of an assembled MoE on the mixed stream (experts
            frozen unless router.freeze_experts=false)
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher

from moe.config import ConfigError, ModelConfig, Recipe, to_dict, to_yaml
from moe.config.load import check_logger
from moe.data.datamodule import DomainDataModule
from moe.io.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    make_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from moe.io.output import claim, recipe_inputs
from moe.io.rundir import (
    AtomicCheckpointIO,
    check_resume_model,
    check_run_dir,
    find_resume_ckpt,
    launch_rank_is_zero,
    prepare_run_dir,
    read_resume_state,
)
from moe.model.transformer import Transformer
from moe.train.module import LitLM
from moe.train.signals import Interrupted, deferred, hold, pending
from moe.train.tracking import Tracking, ledger


@dataclasses.dataclass
class StagePlan:
    model: Transformer
    data: object  # DataConfig for this stage
    trainable: str
    meta: dict  # lineage fields for the final checkpoint (parents, base_id, family, ...)
    parent_tokens: int = 0
    parent_flops: float = 0.0
    tokenizer: object = None  # the tokenizer packing uses and the checkpoint carries


def _tokenizer(r: Recipe, model: Transformer, init_dir: Path | None):
    """The stage's tokenizer: init='s own (data.tokenizer may only name the same one, or give
    one to a checkpoint imported without any), else data.tokenizer (byte when unset)."""
    from moe.data.tokenizer import check_vocab, checkpoint_tokenizer, load_tokenizer

    if init_dir is not None:
        return checkpoint_tokenizer(init_dir, model.config.vocab_size, r.data.tokenizer)
    tok = load_tokenizer(r.data.tokenizer)
    check_vocab(tok, model.config.vocab_size, "data.tokenizer",
                f"set model.vocab_size={tok.vocab_size} (or more)")
    return tok


def _load_init(path: str) -> tuple[Transformer, dict]:
    from moe.io.checkpoint import load_model

    loaded = load_model(path)  # weights checked against config.json (names and shapes)
    return loaded.model, loaded.meta


def _init_from_distribution(r: Recipe) -> tuple[Transformer, dict, dict]:
    """`init_from:` + `init_method:`: a fresh model made from a trained checkpoint's weights.

    Only `trained` and `select` carry the source's training into the lineage's token count; the
    distribution methods start a new model whose parent is recorded but whose compute is not.
    """
    from moe.model.init_dist import METHODS, init_state

    if r.init_method not in METHODS:  # before anything is read or written
        raise ConfigError(f"recipe: init_method: unknown method {r.init_method!r}; choose one "
                          f"of {', '.join(sorted(METHODS))}")
    src = resolve_checkpoint(r.init_from)
    ck = load_checkpoint(src)
    target = r.model.resolved() if r.init_method == "select" else None
    res = init_state(ck.state_dict, ck.config, r.init_method, target, seed=r.seed)
    model = Transformer.from_state(res.config, res.state_dict)
    carried = r.init_method in ("trained", "select")
    pmeta = dict(ck.meta)
    if not carried:
        pmeta.update(tokens_seen=0, train_flops=0.0)
    return model, pmeta, {"init": {"source_id": ck.meta["id"], "method": r.init_method}}


def check_fits(r: Recipe, config: ModelConfig, what: str, training: bool = True) -> None:
    """Refuse a model the machine cannot hold (or train: weights, gradients and AdamW state on
    the recipe's accelerator) before it is built (moe.model.flops.check_memory)."""
    from moe.model.flops import check_memory

    acc, prec = r.trainer.accelerator, str(r.trainer.precision)
    if training and acc in ("auto", "cpu", "gpu", "cuda"):  # others (mps, tpu): not estimated
        cuda = acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
        width = 8 if prec.startswith("64") else 2 if prec in ("16-true", "bf16-true") else 4
        # activations of one micro-batch, at the least: one saved (batch, seq, dim) tensor per
        # layer (what activation checkpointing keeps; the logits may be computed in blocks)
        m, d = config.resolved(), r.data
        acts = d.batch_size * d.seq_len * m.n_layers * m.dim * width
        check_memory(config, what, training=True, device="cuda" if cuda else "cpu",
                     bytes_per_param=width, extra=acts)  # fmt: skip
    check_memory(config, what)  # every model is built on the CPU first, in fp32


def _trains_everything(r: Recipe) -> bool:
    """Whether the stage trains every parameter (then each needs its gradient and AdamW state)."""
    if r.optim.trainable is not None:
        return r.optim.trainable == "all"
    if r.stage == "branch":
        return not r.branch.freeze_shared
    return not (r.stage == "router" and r.router.freeze_experts)


def plan_stage(r: Recipe) -> StagePlan:
    data = dataclasses.replace(r.data)
    init_meta = {}
    if r.init or r.init_from:
        from moe.io.checkpoint import read_config

        src_cfg = read_config(resolve_checkpoint(r.init or r.init_from))
        # the source is read whole; with init_from= the target (select: the recipe's model)
        # is made beside it; training needs more, checked below once the model is known
        check_fits(r, src_cfg, f"init={r.init}" if r.init else f"init_from={r.init_from}",
                   training=False)  # fmt: skip
    if r.init:
        model, pmeta = _load_init(r.init)
    elif r.init_from:
        model, pmeta, init_meta = _init_from_distribution(r)
    else:
        check_fits(r, r.model, "model", training=_trains_everything(r))
        model, pmeta = Transformer(r.model), None

    src = r.init or r.init_from
    tokenizer = _tokenizer(r, model, resolve_checkpoint(src) if src else None)
    lineage = {}
    if pmeta is not None:
        lineage = dict(
            parents=[pmeta["id"]],
            base_id=pmeta.get("base_id") or pmeta["id"],
            family=pmeta.get("family"),
        )
    if init_meta:
        lineage.update(init_meta)
        if r.init_method not in ("trained", "select"):
            # a new model made from the source's distribution: not a fine-tune of it
            lineage = dict(parents=[pmeta["id"]], **init_meta)
    trainable = "all"
    kind = "moe" if model.config.moe.experts else "dense"
    if r.stage == "branch":
        dom = r.branch.domain
        if model.config.moe.experts:
            from moe.model.split import extract_branch

            model = extract_branch(model, dom)
            lineage["shared_ffn_dim"] = model.shared_ffn_dim
        elif pmeta is not None:
            lineage["shared_ffn_dim"] = int(pmeta.get("shared_ffn_dim", 0))
        data = dataclasses.replace(data, domains=[dom], stream="separate", weights={})
        trainable = "ffn" if r.branch.freeze_shared else "all"
        lineage.update(family=dom, domain=dom)
        kind = "branch"
    elif r.stage == "joint":
        if not model.config.moe.experts:
            raise ConfigError(
                "stage=joint needs an MoE model: set model.moe.experts or init=<moe checkpoint>"
            )
        if model.config.moe.router == "domain":
            missing = [d for d in data.domains if d not in model.config.moe.experts]
            if missing:
                raise ConfigError(
                    f"stage=joint with router=domain: domain(s) {', '.join(missing)} have no expert"
                )
    if r.stage in ("joint", "router"):
        m = model.config.moe
        if m.router == "learned" and m.top_k == 1 and m.normalize_weights and len(m.experts) > 1:
            raise ConfigError(
                f"stage={r.stage}: a learned top-1 router with renormalised weights gives every "
                "token weight 1, so the router gets no gradient from the loss; use top_k >= 2 "
                "or model.moe.normalize_weights=false (Switch style)"
            )
    if r.stage == "router":
        if not model.config.moe.experts or model.config.moe.router != "learned":
            raise ConfigError("stage=router needs init=<MoE checkpoint with a learned router>")
        trainable = "router" if r.router.freeze_experts else "all"
    elif r.stage == "dense" and model.config.moe.experts:
        raise ConfigError("stage=dense got an MoE model; use stage=joint or stage=router")
    if r.stage in ("dense", "joint", "router") and len(data.domains) == 1:
        lineage.setdefault("domain", data.domains[0])
    if r.optim.trainable is not None:
        trainable = r.optim.trainable  # an explicit choice overrides the stage's default
    # a runtime choice, not part of the architecture: the recipe's, also for an init= model
    model.config.activation_checkpointing = r.model.activation_checkpointing
    if data.seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({data.seq_len}) is larger than the model's context "
            f"max_seq_len ({model.config.max_seq_len})"
        )
    if (r.init or r.init_from) and trainable == "all":
        # weights loaded and fitting; their gradients and AdamW state are not allocated yet
        check_fits(r, model.config, f"init={r.init}" if r.init else "model")
    lineage["kind"] = kind
    return StagePlan(
        model=model,
        data=data,
        trainable=trainable,
        meta=lineage,
        parent_tokens=int(pmeta.get("tokens_seen", 0)) if pmeta else 0,
        parent_flops=float(pmeta.get("train_flops", 0.0)) if pmeta else 0.0,
        tokenizer=tokenizer,
    )


class StageProgressBar(TQDMProgressBar):
    """Steps of this stage with loss and ETA; named after the stage instead of "Epoch 0"."""

    def __init__(self, label: str):
        super().__init__(refresh_rate=1)
        self.label = label

    def init_train_tqdm(self):
        # a resumed or forked run starts mid-epoch, where on_train_epoch_start is not called
        bar = super().init_train_tqdm()
        bar.set_description(self.label)
        return bar

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.label)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class SaveFinalStep(pl.Callback):
    """Write last.ckpt after the final step too, inside the loop like the periodic saves.

    The final state is what later runs fork from (a study's branches, the monolith continuing
    the seed). Lightning's own end-of-fit save records a finished loop, and a run resumed from it
    does not replay the same batches, so the save happens at the last batch's end instead.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.save_checkpoint(str(self.path))


class StopOnSignal(pl.Callback):
    """At the end of each optimizer step, stop if SIGTERM/SIGINT came (moe/train/signals.py):
    write the Lightning resume file at this step, where the periodic saves write it, and raise
    `Interrupted`. Every rank takes part in the decision, so all stop at the same step."""

    def __init__(self, path: Path):
        self.path = path
        self._step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        hold()  # the trainer has just put its own SIGTERM handler in place of ours
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # inside gradient accumulation: the optimizer step has not happened yet
        self._step = trainer.global_step
        signum = pending() or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the largest signal any rank holds: a terminal's Ctrl-C reaches every rank, a
            # `kill` or a scheduler perhaps only one
            t = torch.tensor([signum], device=pl_module.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        if signum:
            trainer.save_checkpoint(str(self.path))  # on every rank: a collective under FSDP
            raise Interrupted(signum, step=int(trainer.global_step))


def _strategy(name: str):
    """Lightning's strategy for `trainer.strategy`; `fsdp` shards each transformer block as its
    own unit (only one block's full weights exist at a time), not the model as one unit."""
    if name == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        from moe.model.transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)
    return name


def train(r: Recipe) -> Path:
    """Run one training stage; returns the final checkpoint directory (`out_dir/model`).

    `resume=` continues this run from its own Lightning checkpoint; `fork=` starts a new run from
    another run's Lightning checkpoint, carrying its weights, AdamW state, step and LR schedule
    position (a killed fork resumes from its own checkpoint, not the parent's).
    """
    resume_ckpt = find_resume_ckpt(r.resume) if r.resume else None
    fork_ckpt = find_resume_ckpt(r.fork) if r.fork else None
    # multi-process launches (Lightning's ddp re-runs this command per rank, torchrun, SLURM):
    # rank 0 alone checks, creates and locks the run directory and writes into it; the other
    # ranks write nothing there and meet rank 0 at the process group's start inside fit
    rank0 = launch_rank_is_zero()
    run = Path(r.out_dir)
    # the run's claim (moe/io/output.py) comes first: a run that another job holds, or whose
    # inputs lie in what this one replaces, is refused before anything here is touched
    writes = [run / "model", run / "logs", run / "resume", run / "recipe.yaml"]
    resume = resume_ckpt is not None
    inputs = [*recipe_inputs(r), fork_ckpt]
    check_logger(r.trainer)  # a tracker whose package is missing: refused before any work
    with (claim(run, inputs, writes) if rank0 else contextlib.nullcontext(),
          contextlib.ExitStack() as closing):
        if rank0:
            check_run_dir(run, overwrite=r.overwrite, resume=resume)
        start_ckpt = resume_ckpt or fork_ckpt
        start_step, state = read_resume_state(start_ckpt) if start_ckpt else (0, {})
        # where this run's own schedule segment began: the parent's step for a fork, what the
        # checkpoint recorded for a resume (itself a fork, or a run from scratch)
        schedule_start = start_step if fork_ckpt else int(state.get("schedule_start", 0))
        if fork_ckpt is not None and start_step >= r.trainer.max_steps:
            raise ConfigError(
                f"fork: {fork_ckpt} is at step {start_step}, not before trainer.max_steps "
                f"({r.trainer.max_steps}); the forked run would train no step"
            )
        if resume_ckpt is not None and start_step > r.trainer.max_steps:
            raise ConfigError(
                f"resume: {resume_ckpt} is at step {start_step}, past trainer.max_steps "
                f"({r.trainer.max_steps}); raise trainer.max_steps to train it further"
            )
        pl.seed_everything(r.seed, workers=True, verbose=False)
        plan = plan_stage(r)
        if start_ckpt is not None:
            check_resume_model(start_ckpt, plan.model, "resume" if resume else "fork")
        # what was really trained on (a branch forces its single domain) is what gets recorded
        r = dataclasses.replace(r, data=plan.data)
        t = r.trainer
        dm = DomainDataModule(
            plan.data, seed=r.seed, start_step=start_step * t.accumulate_grad_batches,
            tokenizer=plan.tokenizer,
        )
        dm.prepare_data()
        dm.setup("fit")
        lit = LitLM(
            plan.model,
            r.optim,
            dm.domain_names,
            max_steps=t.max_steps,
            seq_len=plan.data.seq_len,
            val_domains=list(plan.data.domains),
            nan_policy=t.nan_policy,
            trainable=plan.trainable,
            schedule_steps=r.optim.total_steps,
            schedule_start=schedule_start,
            forked=fork_ckpt is not None,
        )
        if rank0:
            # every check passed and the data is read: only now is the directory created (an
            # overwrite clears it), so a refused run leaves nothing behind
            prepare_run_dir(run, overwrite=r.overwrite, resume=resume)
        # metrics.csv, and the trainer.logger tracker on rank 0 (moe/train/tracking.py)
        tracking = Tracking(run, t, r.name, keep_before=start_step if resume and rank0 else None,
                            rank0=rank0)  # fmt: skip
        ckpt_cb = ModelCheckpoint(
            dirpath=str(run / "resume"),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=t.checkpoint_every_n_steps,
            enable_version_counter=False,
        )
        trainer = pl.Trainer(
            max_steps=t.max_steps,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=_strategy(t.strategy),
            num_nodes=t.num_nodes,
            precision=t.precision,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=r.optim.grad_clip or None,
            val_check_interval=min(t.val_check_interval, t.max_steps) * t.accumulate_grad_batches,
            check_val_every_n_epoch=None,
            limit_val_batches=t.limit_val_batches,
            num_sanity_val_steps=0,
            log_every_n_steps=t.log_every_n_steps,
            enable_progress_bar=t.enable_progress_bar,
            deterministic=t.deterministic,
            callbacks=[ckpt_cb, SaveFinalStep(run / "resume" / "last.ckpt"),
                       StopOnSignal(run / "resume" / "last.ckpt")]
            + ([StageProgressBar(f"{r.name} [{r.stage}]")] if t.enable_progress_bar else []),
            logger=tracking.loggers,
            plugins=[AtomicCheckpointIO()],
            # every rank evaluates the same held-out batches: validation numbers do not depend
            # on the number of devices (training batches are dealt per rank by TrainBatches)
            use_distributed_sampler=False,
            enable_model_summary=False,
            default_root_dir=str(run),
        )
        # the tracker's run is closed when the stage ends (finished, or failed on an exception)
        closing.enter_context(tracking)
        if rank0 and trainer.is_global_zero:
            atomic_write_text(run / "recipe.yaml", to_yaml(r))
            tracking.log_recipe(to_dict(r), to_yaml(r))
        t0 = time.perf_counter()
        # SIGTERM/SIGINT stop training at the end of the step in progress, with a resume file
        # written there, and no model (moe/train/signals.py)
        with deferred(run):
            trainer.fit(lit, datamodule=dm, ckpt_path=str(start_ckpt) if start_ckpt else None)
            wall = time.perf_counter() - t0
            global_step = int(trainer.global_step)
            if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
                # ddp_spawn: worker processes trained and sent back only the weights; the step
                # and the (already all-rank) token counters are in the final resume checkpoint
                global_step, state = read_resume_state(run / "resume" / "last.ckpt")
                lit.restore_counters(state, forked=False)
            if pending():  # it came after the last step, whose resume file SaveFinalStep wrote
                raise Interrupted(pending(), step=global_step)
        stage_tokens = lit.run_tokens
        stage_flops = stage_tokens * lit.flops_per_token
        out = run / "model"
        # a sharded strategy (FSDP) gathers the full weights: a collective, so every rank calls it
        state_dict = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            meta = make_meta(
                **plan.meta,
                tokens_seen=plan.parent_tokens + stage_tokens,
                train_flops=plan.parent_flops + stage_flops,
                stage=dict(
                    name=r.stage,
                    steps=global_step - schedule_start,
                    first_step=schedule_start,
                    tokens=stage_tokens,
                    tokens_by_domain=lit.run_tokens_by_domain(),
                    flops=stage_flops,
                    wall_s=round(wall, 2),
                    skipped_steps=lit.skipped_steps,
                    tokens_per_s=round(stage_tokens / max(wall, 1e-9), 1),
                ),
                recipe=to_dict(r),
            )
            weights = {
                k.removeprefix("model."): v.detach().cpu()
                for k, v in state_dict.items()
                if k.startswith("model.")
            }
            save_checkpoint(out, weights, lit.model.config, meta, overwrite=True,
                            tokenizer=plan.tokenizer)
            tracking.log_ledger(ledger(meta), step=global_step)
            print(
                f"saved {out}  ({stage_tokens:,} tokens in {wall:.1f}s, "
                f"{stage_tokens / max(wall, 1e-9):,.0f} tokens/s)",
                file=sys.stderr,
            )
        return out
