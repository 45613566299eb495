"""moe/train/loop.py: the plain step loop equals a hand-written loop around LitLM (the way prune
healing, the init study and the fleet trained before they shared it) bit for bit; it counts its
steps; it refuses a non-finite loss; frozen parameters stay put."""

import pytest
import torch

from moe.config import DataConfig, ModelConfig, MoEConfig, OptimConfig
from moe.data.datamodule import DomainDataModule
from moe.model.transformer import Transformer
from moe.train.loop import lm_loss, make_optimizer, set_trainable, train_steps
from moe.train.module import LitLM

DENSE = ModelConfig(size="debug", dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                    max_seq_len=32)  # fmt: skip
MOE = ModelConfig(size="debug", dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                  max_seq_len=32, moe=MoEConfig(experts=["text", "dna"], router="domain"))
DATA = DataConfig(domains=["text", "dna"], stream="mixed", bytes_per_domain=40_000, seq_len=32,
                  batch_size=4)  # fmt: skip
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.3)


@pytest.fixture(scope="module")
def dm():
    d = DomainDataModule(DATA, seed=5)
    d.setup()
    return d


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


def _reference(model, optim, steps, dm, trainable="all"):
    """The loop as the three callers wrote it by hand, around LitLM."""
    lit = LitLM(model, optim, dm.domain_names, max_steps=steps, seq_len=DATA.seq_len,
                trainable=trainable)  # fmt: skip
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    batches = dm.train_batches(0)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for step in range(steps):
        loss_sum, _, mask, _ = lit(batches.batch(step))
        loss = loss_sum / mask.sum().clamp(min=1)
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("cfg,optim,trainable", [
    (DENSE, OPTIM, "all"),
    (MOE, OPTIM, "all"),  # the domain router gets each sequence's expert
    (MOE, OptimConfig(lr=2e-3, warmup_steps=1, grad_clip=0.0), "ffn"),  # no clipping
    (DENSE, OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine"), "embeddings"),
])  # fmt: skip
def test_equals_the_hand_written_loop_bit_for_bit(dm, cfg, optim, trainable):
    steps = 6
    ref = _model(cfg)
    want = _reference(ref, optim, steps, dm, trainable)
    got = _model(cfg)
    opt, sched = make_optimizer(got, optim, steps, trainable=trainable)
    done = train_steps(got, opt, dm.train_batches(0), steps, sched=sched,
                       domain_names=dm.domain_names, grad_clip=optim.grad_clip)  # fmt: skip
    assert done.losses == want and done.diverged_at is None
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k
    assert [p.requires_grad for p in ref.parameters()] == [
        p.requires_grad for p in got.parameters()]  # fmt: skip


def test_optimizer_groups_and_loss_are_litlms(dm):
    model = _model(MOE)
    lit = LitLM(model, OPTIM, dm.domain_names, max_steps=9, seq_len=DATA.seq_len)
    want = lit.configure_optimizers()["optimizer"]
    opt, sched = make_optimizer(model, OPTIM, 9)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in want.param_groups]  # fmt: skip
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in want.param_groups]  # fmt: skip
    batch = dm.train_batches(0).batch(0)
    from moe.train.loop import expert_table

    a = lm_loss(model, batch, expert_table(model, dm.domain_names), dm.domain_names)
    b = lit(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_counts_its_steps_from_start(dm):
    model = _model(DENSE)
    opt, sched = make_optimizer(model, OPTIM, 10)
    stream = dm.train_batches(0)
    seen, drawn = [], []

    def batches(i):
        drawn.append(i)
        return stream.batch(i)

    done = train_steps(model, opt, batches, 3, sched=sched, grad_clip=1.0, start=4,
                       on_step=seen.append)  # fmt: skip
    assert seen == drawn == [4, 5, 6]
    assert len(done.losses) == 3 and done.diverged_at is None
    assert sched.last_epoch == 3  # the schedule advanced once per step
    assert all(int(s["step"]) == 3 for s in opt.state.values())
    assert model.training
    assert train_steps(model, opt, stream, 0).losses == []  # no step, no update


def test_a_non_finite_loss_is_refused(dm):
    model = _model(DENSE)
    opt, sched = make_optimizer(model, OPTIM, 10)
    before: dict = {}

    def poison(i):
        if i == 2:
            before.update({k: v.clone() for k, v in model.state_dict().items()})
            with torch.no_grad():
                model.norm.weight.fill_(float("nan"))

    done = train_steps(model, opt, dm.train_batches(0), 10, sched=sched, grad_clip=1.0,
                       on_step=poison)  # fmt: skip
    assert done.diverged_at == 2 and len(done.losses) == 2
    assert done.bad_loss != done.bad_loss  # NaN
    assert sched.last_epoch == 2 and all(int(s["step"]) == 2 for s in opt.state.values())
    for k, v in model.state_dict().items():  # no update from the NaN step
        if k != "norm.weight":
            assert torch.equal(v, before[k]), k


def test_a_domain_router_needs_the_domain_names(dm):
    model = _model(MOE)
    opt, _ = make_optimizer(model, OPTIM, 2)
    with pytest.raises(ValueError, match="domain_names"):
        train_steps(model, opt, dm.train_batches(0), 1)
    bad = MoEConfig(experts=["text"], router="domain")
    model = _model(ModelConfig(size="debug", dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                               ffn_dim=32, max_seq_len=32, moe=bad))  # fmt: skip
    opt, _ = make_optimizer(model, OPTIM, 2)
    with pytest.raises(ValueError, match="dna have no expert"):
        train_steps(model, opt, dm.train_batches(0), 2, domain_names=dm.domain_names)


def test_frozen_parameters_do_not_move(dm):
    model = _model(DENSE)
    start = {k: v.clone() for k, v in model.named_parameters()}
    opt, sched = make_optimizer(model, OPTIM, 3, trainable="embeddings")
    train_steps(model, opt, dm.train_batches(0), 3, sched=sched, grad_clip=1.0)
    for k, v in model.named_parameters():
        assert torch.equal(v, start[k]) != (k in ("tok_emb.weight", "lm_head.weight")), k
    with pytest.raises(ValueError, match="unknown trainable set"):
        set_trainable(model, "bogus")
