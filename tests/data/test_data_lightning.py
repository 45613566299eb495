"""The datamodule under a real Lightning Trainer: infinite training stream, per-domain val."""

from dataclasses import replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from moe.config import DataConfig
from moe.data.datamodule import DomainDataModule
from moe.data.tokenizer import IGNORE_INDEX


class Bigram(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(259, 259)
        self.seen: list[torch.Tensor] = []
        self.val_domains: dict[int, set] = {}

    def loss(self, batch):
        logits = self.emb(batch["input_ids"])
        return F.cross_entropy(logits.view(-1, 259), batch["targets"].view(-1),
                               ignore_index=IGNORE_INDEX)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return self.loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_domains.setdefault(dataloader_idx, set()).update(batch["domain"].tolist())
        self.log("val", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, steps):
    m = Bigram()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=steps,
                         check_val_every_n_epoch=None, limit_val_batches=2,
                         num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    return m


def test_trainer_runs_and_resume_by_step_matches():
    cfg = replace(DataConfig(), bytes_per_domain=30_000, seq_len=32, batch_size=2)
    full = fit(DomainDataModule(cfg, seed=3), 6)
    assert len(full.seen) == 6
    assert full.val_domains == {0: {0}, 1: {1}, 2: {2}}
    resumed = fit(DomainDataModule(cfg, seed=3, start_step=4), 2)
    for a, b in zip(full.seen[4:], resumed.seen):
        assert torch.equal(a, b)
