"""A thin LightningModule around `Transformer`: loss, per-domain logging, AdamW + LR schedule.

The model itself is a plain nn.Module (moe.model.transformer); this file only adds what training
needs. Lightning's Trainer owns the loop, precision, devices and strategy.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from moe.config import ModelConfig, OptimConfig
from moe.model.flops import train_flops_per_token
from moe.model.loss import bits_per_byte
from moe.model.moe_layer import domain_to_expert, update_router_biases
from moe.model.transformer import Transformer
from moe.train.loop import lm_loss, set_trainable
from moe.train.schedule import adamw_with_schedule


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (message names the step and the domains in the batch)."""


class LitLM(pl.LightningModule):
    def __init__(
        self,
        model: Transformer,
        optim: OptimConfig,
        domain_names: list[str],
        max_steps: int,
        seq_len: int,
        val_domains: list[str] | None = None,
        nan_policy: str = "stop",
        trainable: str = "all",
        schedule_steps: int | None = None,
        schedule_start: int = 0,
        forked: bool = False,
    ):
        super().__init__()
        self.model = model
        self.optim = optim
        self.domain_names = list(domain_names)
        self.val_domains = list(val_domains or domain_names)
        self.max_steps = max_steps
        # the LR schedule spans schedule_steps (default max_steps); schedule_start is where a
        # forked run began (a wsd cool-down never starts before it)
        self.schedule_steps = schedule_steps or max_steps
        self.schedule_start = schedule_start
        # loading a checkpoint: a fork's counters are its parent's totals at the fork point (this
        # run's own counts start there); a resume's counters are this run's own
        self.forked = forked
        self.nan_policy = nan_policy
        self.flops_per_token = train_flops_per_token(model.config, seq_len)
        cfg: ModelConfig = model.config
        experts = list(cfg.moe.experts)
        self.register_buffer(
            "expert_of_domain", domain_to_expert(self.domain_names, experts), persistent=False
        )
        self.set_trainable(trainable)
        # counted here (not derived from steps) so resumed and skipped steps stay exact
        self.tokens_seen = 0
        self.tokens_by_domain: dict[str, int] = {}
        self.skipped_steps = 0
        self.start_tokens = 0  # tokens_seen when this run began (non-zero after a fork)
        self.start_tokens_by_domain: dict[str, int] = {}
        self._val_sums: dict[int, list[float]] = {}
        # optim.init_state: AdamW moments to start from, read and checked against the model now
        # (a one-line error before the run directory is touched), put into the optimizer when
        # training starts unless the run resumes or forks (its checkpoint's state wins)
        self._init_state: dict | None = None
        if optim.init_state and not forked:
            from moe.train.init_state import check_adam_state, read_adam_state

            self._init_state = read_adam_state(optim.init_state)
            check_adam_state(self.model, self._init_state)

    # ------------------------------------------------------------------ parameters

    def set_trainable(self, which: str) -> None:
        """Which parameters train: moe.train.loop.set_trainable's choices."""
        set_trainable(self.model, which)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """Summed loss (carries the gradient), per-token losses (B, L) (no gradient), the target
        mask (B, L) and the model output (moe.train.loop.lm_loss: the head and the loss run
        chunked over positions, so the (B, L, V) logits never exist at once)."""
        c = self.model.config
        table = self.expert_of_domain if c.moe.experts and c.moe.router == "domain" else None
        return lm_loss(self.model, batch, table, self.domain_names)

    def training_step(self, batch: dict, batch_idx: int):
        loss_sum, loss_BL, mask_BL, out = self(batch)
        n_tok = mask_BL.sum()
        loss = loss_sum / n_tok.clamp(min=1)
        total = loss + out.aux_loss if out.aux_loss is not None else loss
        if not torch.isfinite(total):
            doms = sorted({self.domain_names[int(d)] for d in batch["domain"].unique()})
            msg = (
                f"non-finite loss ({loss.item()}) at step {self.global_step} "
                f"on domain(s) {', '.join(doms)}"
            )
            if self.nan_policy == "skip":
                self.skipped_steps += 1
                self.print(f"warning: {msg}; step skipped (trainer.nan_policy=skip)")
                return None
            raise NonFiniteLossError(msg + " (set trainer.nan_policy=skip to skip such steps)")
        self._count_tokens(batch["domain"], mask_BL)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss, batch_size=bs)
        for d in batch["domain"].unique().tolist():
            sel = batch["domain"] == d
            n_d = mask_BL[sel].sum()
            name = self.domain_names[d]
            dl = loss_BL[sel].sum() / n_d.clamp(min=1)
            self.log(f"train/loss_{name}", dl, batch_size=int(sel.sum()))
        self._log_routing(out, batch, prefix="train")
        return total

    def _count_tokens(self, domain_B: torch.Tensor, mask_BL: torch.Tensor) -> None:
        """Add this step's target tokens, per domain, summed over every rank: the counters (and
        the ledger built from them) are the whole job's, identical on every rank."""
        per_row = mask_BL.sum(dim=1)  # (B,)
        counts_D = torch.zeros(len(self.domain_names), dtype=torch.long, device=per_row.device)
        counts_D.index_add_(0, domain_B, per_row.long())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_D)
        counts = counts_D.tolist()
        self.tokens_seen += sum(counts)
        for name, n in zip(self.domain_names, counts):
            if n:
                self.tokens_by_domain[name] = self.tokens_by_domain.get(name, 0) + n

    def _log_routing(self, out, batch: dict, prefix: str) -> None:
        if not out.router_stats or self.global_step % max(1, self.trainer.log_every_n_steps):
            return
        B, L = batch["input_ids"].shape
        dom_T = batch["domain"].view(B, 1).expand(B, L).reshape(-1)
        for li, st in enumerate(out.router_stats):
            ids_TK, E = st["expert_ids"], st["num_experts"]
            names = self.model.config.moe.experts
            for d in dom_T.unique().tolist():
                share = torch.bincount(ids_TK[dom_T == d].reshape(-1), minlength=E).float()
                share = share / share.sum().clamp(min=1)
                for e in range(E):
                    self.log(
                        f"{prefix}_route/l{li}_{self.domain_names[d]}_to_{names[e]}",
                        share[e],
                        batch_size=B,
                    )

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/tokens", float(self.tokens_seen), batch_size=1)

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        _, loss_BL, mask_BL, _ = self(batch)
        s = self._val_sums.setdefault(dataloader_idx, [0.0, 0.0, 0.0])
        s[0] += float(loss_BL[mask_BL].double().sum())
        s[1] += float(mask_BL.sum())
        s[2] += float(batch["target_bytes"].sum())

    def on_validation_epoch_end(self):
        # every rank evaluates the same held-out batches (no distributed sampler), so the mean
        # over ranks (sync_dist) is each rank's own value
        for idx, (nats, toks, nbytes) in sorted(self._val_sums.items()):
            name = self.val_domains[idx]
            self.log(
                f"val/loss_{name}", nats / max(toks, 1), add_dataloader_idx=False, sync_dist=True
            )
            self.log(
                f"val/bpb_{name}",
                bits_per_byte(nats, nbytes),
                add_dataloader_idx=False,
                sync_dist=True,
            )
        self._val_sums = {}

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        opt, sched = adamw_with_schedule(self.model, self.optim, self.schedule_steps,
                                         self.schedule_start)  # fmt: skip
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # once per optimizer step (after gradient accumulation): then the aux-free balancing
        # biases move by the loads that step's forwards counted (moe.model.moe_layer)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        update_router_biases(self.model)

    def on_train_start(self) -> None:
        # after Lightning restored a resume or fork checkpoint (if any), before the first step
        state, self._init_state = self._init_state, None
        if state is not None and self.trainer.ckpt_path is None:
            from moe.train.init_state import load_adam_state

            load_adam_state(self.trainer.optimizers[0], self.model, state)

    # ------------------------------------------------------------------ resume state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["moe_forge"] = {
            "tokens_seen": self.tokens_seen,
            "tokens_by_domain": dict(self.tokens_by_domain),
            "skipped": self.skipped_steps,
            "start_tokens": self.start_tokens,
            "start_tokens_by_domain": dict(self.start_tokens_by_domain),
            "schedule_start": self.schedule_start,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restore_counters(checkpoint.get("moe_forge", {}), self.forked)

    def restore_counters(self, st: dict, forked: bool) -> None:
        """Counters from a checkpoint's `moe_forge` state (a fork's are its parent's totals)."""
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.tokens_by_domain = {k: int(v) for k, v in st.get("tokens_by_domain", {}).items()}
        if forked:
            self.start_tokens = self.tokens_seen
            self.start_tokens_by_domain = dict(self.tokens_by_domain)
            self.skipped_steps = 0
        else:
            self.start_tokens = int(st.get("start_tokens", 0))
            self.start_tokens_by_domain = {
                k: int(v) for k, v in st.get("start_tokens_by_domain", {}).items()
            }
            self.skipped_steps = int(st.get("skipped", 0))

    @property
    def run_tokens(self) -> int:
        """Tokens this run trained on itself (after its fork point, if it forked)."""
        return self.tokens_seen - self.start_tokens

    def run_tokens_by_domain(self) -> dict[str, int]:
        return {
            k: v - self.start_tokens_by_domain.get(k, 0)
            for k, v in sorted(self.tokens_by_domain.items())
            if v - self.start_tokens_by_domain.get(k, 0) > 0
        }
