"""moe/eval/heldout.py: held-out bpb per domain is bits_per_byte of the summed token NLL over the
bytes the targets cover; the model's mode is kept."""

import math

import torch
import torch.nn.functional as F

from moe.config import DataConfig, ModelConfig
from moe.data.datamodule import DomainDataModule
from moe.eval.heldout import HeldOut
from moe.model.transformer import IGNORE_INDEX, Transformer

CFG = ModelConfig(size="debug", dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                  max_seq_len=32)  # fmt: skip
DATA = DataConfig(domains=["text", "dna"], stream="mixed", bytes_per_domain=40_000, seq_len=32,
                  batch_size=4)  # fmt: skip


def test_bpb_by_hand_and_mode_kept():
    dm = DomainDataModule(DATA, seed=3)
    dm.setup()
    held = HeldOut(dm, ["text", "dna"], 2, 4)
    assert all(len(b) == 2 for b in held.batches.values())
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.train()
    got = held.bpb(model)
    assert model.training
    model.eval()
    for d in ("text", "dna"):
        nll, nbytes = 0.0, 0
        for b in dm.heldout_loader(d, 4, 2):
            with torch.no_grad():
                logits = model(b["input_ids"]).logits.float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            nbytes += int(b["target_bytes"].sum())
        assert math.isclose(got[d], nll / nbytes / math.log(2), rel_tol=1e-12)
    assert math.isclose(got["mean"], (got["text"] + got["dna"]) / 2, rel_tol=1e-15)
