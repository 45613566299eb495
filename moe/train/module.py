"""A thin LightningModule around `Transformer`: loss, per-domain logging, AdamW + LR schedule.

The model itself is a plain nn.Module (moe.model.transformer); this file only adds what training
needs. Lightning's Trainer owns the loop, precision, devices and strategy.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from moe.config import ModelConfig, OptimConfig
from moe.model.flops import train_flops_per_token
from moe.model.loss import bits_per_byte, linear_cross_entropy
from moe.model.moe_layer import domain_to_expert
from moe.model.transformer import IGNORE_INDEX, Transformer


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

    # ------------------------------------------------------------------ parameters

    def set_trainable(self, which: str) -> None:
        """all | router (only routers) | ffn (FFN and expert weights, shared expert included,
        no router) | experts (only the routed experts of MoE layers) | embeddings (the token
        embedding and the output head)."""
        for name, p in self.model.named_parameters():
            if which == "all":
                p.requires_grad_(True)
            elif which == "router":
                p.requires_grad_(".router." in name)
            elif which == "ffn":
                p.requires_grad_(".ffn." in name and ".router." not in name)
            elif which == "experts":
                # MoEFFN keeps its experts as (E, ...) tensors named ffn.w1/w3/w2 (no .weight)
                p.requires_grad_(name.endswith((".ffn.w1", ".ffn.w3", ".ffn.w2")))
            elif which == "embeddings":  # a retokenized model's new embeddings, body frozen
                p.requires_grad_(name in ("tok_emb.weight", "lm_head.weight"))
            else:
                raise ValueError(f"unknown trainable set {which!r}")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"trainable={which!r} leaves no parameter to train in this model")

    # ------------------------------------------------------------------ forward

    def _expert_hint(self, domain: torch.Tensor) -> torch.Tensor | None:
        if not self.model.config.moe.experts or self.model.config.moe.router != "domain":
            return None
        hint = self.expert_of_domain[domain]
        if (hint < 0).any():
            missing = sorted({self.domain_names[int(d)] for d in domain[hint < 0]})
            raise ValueError(f"domain(s) {', '.join(missing)} have no expert in this model")
        return hint

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """Summed loss (carries the gradient), per-token losses (B, T) (no gradient), the target
        mask (B, T) and the model output. The head and the loss run chunked over positions
        (moe.model.loss): the (B, T, V) logits never exist at once."""
        out = self.model(
            batch["input_ids"], domain=self._expert_hint(batch["domain"]), return_hidden=True
        )
        tgt = batch["targets"]
        total, loss_BT = linear_cross_entropy(out.hidden, self.model.head_weight, tgt)
        return total, loss_BT, (tgt != IGNORE_INDEX), out

    def training_step(self, batch: dict, batch_idx: int):
        loss_sum, loss_BT, mask_BT, out = self(batch)
        n_tok = mask_BT.sum()
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
        self._count_tokens(batch["domain"], mask_BT)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss, batch_size=bs)
        for d in batch["domain"].unique().tolist():
            sel = batch["domain"] == d
            n_d = mask_BT[sel].sum()
            name = self.domain_names[d]
            dl = loss_BT[sel].sum() / n_d.clamp(min=1)
            self.log(f"train/loss_{name}", dl, batch_size=int(sel.sum()))
        self._log_routing(out, batch, prefix="train")
        return total

    def _count_tokens(self, domain_B: torch.Tensor, mask_BT: torch.Tensor) -> None:
        """Add this step's target tokens, per domain, summed over every rank: the counters (and
        the ledger built from them) are the whole job's, identical on every rank."""
        per_row = mask_BT.sum(dim=1)  # (B,)
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
        B, T = batch["input_ids"].shape
        dom_N = batch["domain"].view(B, 1).expand(B, T).reshape(-1)
        for li, st in enumerate(out.router_stats):
            ids_NK, E = st["expert_ids"], st["num_experts"]
            names = self.model.config.moe.experts
            for d in dom_N.unique().tolist():
                share = torch.bincount(ids_NK[dom_N == d].reshape(-1), minlength=E).float()
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
        _, loss_BT, mask_BT, _ = self(batch)
        s = self._val_sums.setdefault(dataloader_idx, [0.0, 0.0, 0.0])
        s[0] += float(loss_BT[mask_BT].double().sum())
        s[1] += float(mask_BT.sum())
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
        o = self.optim
        decay, no_decay = [], []
        # frozen parameters stay in the groups (they get no gradient, so AdamW skips them): the
        # optimizer state then has the same layout whatever is trained, and a run that freezes
        # part of the model can fork from one that trained all of it
        for name, p in self.model.named_parameters():
            # norms (1-D) and embeddings are not decayed
            (no_decay if p.ndim < 2 or "tok_emb" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o, self.schedule_steps, self.schedule_start)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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


def wsd_decay_start(o: OptimConfig, total: int, start: int = 0) -> int:
    """First step of a wsd cool-down: the last decay_fraction of the schedule's `total` steps.

    Steps count from the start of the lineage, so a run continued from a fork point cools down
    exactly as if it had never been forked. A run forked at `start` late enough that its share
    would begin earlier cools down over all of its own steps.
    """
    return max(start, total - max(1, round(o.decay_fraction * total)))


def lr_lambda(o: OptimConfig, total: int, start: int = 0):
    """LR multiplier at each step: linear warm-up to lr, then the schedule (see OptimConfig).

    cosine decays to lr * min_lr_ratio at `total`; wsd stays at lr until its cool-down, then
    falls linearly to lr * min_lr_ratio at its last step (total - 1); constant stays at lr.
    `start` is where a forked run began (see wsd_decay_start).
    """
    decay_start = wsd_decay_start(o, total, start)

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / max(1, o.warmup_steps)
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / (total - decay_start))
            return 1.0 - (1.0 - o.min_lr_ratio) * progress
        span = max(1, total - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
