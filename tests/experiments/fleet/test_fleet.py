"""The simulated fleet: R = 1, H = 1, average, lossless equals plain training bit for bit; a
killed and resumed fleet equals an uninterrupted one; bad arms are one-line errors."""

import pytest
import torch

from moe.config import ConfigError, DataConfig, ModelConfig, OptimConfig, Recipe
from moe.data.datamodule import DomainDataModule
from moe.experiments.fleet.fleet import FleetSpec, Shard, parse_arm, run_fleet
from moe.experiments.init.study import train_loop
from moe.model.transformer import Transformer

CFG = ModelConfig(size="debug", dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                  max_seq_len=32)  # fmt: skip
DATA = DataConfig(domains=["text", "dna"], stream="mixed", bytes_per_domain=40_000,
                  seq_len=32, batch_size=4)  # fmt: skip
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.3)
SEED = 5


@pytest.fixture(scope="module")
def dm():
    d = DomainDataModule(DATA, seed=SEED)
    d.setup()
    return d


def _init():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Transformer(CFG).state_dict().items()}


def _spec(steps, **kw):
    return FleetSpec(init=_init(), config=CFG, optim=OPTIM, steps=steps, batch_size=4, seed=SEED,
                     eval_every=2, **kw)


def _plain(dm, steps):
    """The project's plain training loop (as the init study trains) on the text stream."""
    data = DataConfig(domains=["text"], stream="separate", bytes_per_domain=40_000, seq_len=32,
                      batch_size=4)  # fmt: skip
    tdm = DomainDataModule(data, seed=SEED, tokenizer=dm.tokenizer)
    tdm._tokens = {"text": dm.tokens("text")}
    model = Transformer(CFG)
    model.load_state_dict(_init())
    train_loop(model, Recipe(model=CFG, data=data, optim=OPTIM), OPTIM, steps, tdm, None, 1, [],
               None)  # fmt: skip
    return model.state_dict()


@pytest.mark.parametrize("arm", ["R=1 H=1 S=0 c=lossless outer=average", "sync R=1",
                                 # one replica that keeps its in-flight progress never jumps
                                 "R=1 H=1 S=2 c=lossless arrive=rebase",
                                 "R=1 H=2 S=1 c=lossless arrive=rebase",
                                 "R=1 H=1 c=lossless ef=1"])  # a lossless message drops nothing
def test_one_replica_every_step_is_plain_training(dm, arm):
    rec = run_fleet(parse_arm(arm, 1, ["text"]), _spec(10), dm, None)
    want = _plain(dm, 10)
    got = rec["final"]["text"]
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # bit for bit


@pytest.mark.parametrize("arm", ["R=1 H=1 c=topk:0.5", "R=1 H=1 S=1 c=lossless",
                                 "R=1 H=1 c=topk:0.5 ef=1"])
def test_lossy_or_stale_fleet_differs_from_plain(dm, arm):
    """The exactness above is not vacuous: a lossy exchange changes the result, and so does a
    stale model that replaces the replica's own (arrive=replace drops its in-flight steps)."""
    rec = run_fleet(parse_arm(arm, 1, ["text"]), _spec(6), dm, None)
    want = _plain(dm, 6)
    assert any(not torch.equal(rec["final"]["text"][k], v) for k, v in want.items())


def test_shards_are_disjoint(dm):
    seqs = dm.sequences("text", "train")
    rows = [set() for _ in range(3)]
    for r in range(3):
        sh = Shard(seqs, r, 3, SEED)
        for i in range(4):
            for x in sh.batch(i, 4)["input_ids"]:
                rows[r].add(tuple(x.tolist()))
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])


def _evaluate(theta):
    return {"sum": float(sum(t.double().sum() for t in theta.values()))}


@pytest.mark.parametrize("arm", ["R=2 H=2 S=1 c=dare:0.5+int8 outer=nesterov",
                                 "R=2 H=1 S=2 c=int8 arrive=rebase",
                                 "R=2 H=1 c=topk:0.3 fam=text,dna x=cross",
                                 "R=2 H=1 c=topk:0.3+int8 ef=1"])  # the residual is state
def test_resumed_fleet_equals_uninterrupted(dm, tmp_path, arm):
    a = parse_arm(arm, 2, ["text"])
    whole = run_fleet(a, _spec(8, checkpoint_every=2), dm, _evaluate, tmp_path / "whole.pt")

    class Kill(Exception):
        pass

    def kill(step):
        if step == 5:
            raise Kill

    st = tmp_path / "killed.pt"
    with pytest.raises(Kill):
        run_fleet(a, _spec(8, checkpoint_every=2), dm, _evaluate, st, on_step=kill)
    assert st.is_file()
    resumed = run_fleet(a, _spec(8, checkpoint_every=2), dm, _evaluate, st)
    for g, theta in whole["final"].items():
        for k, v in theta.items():
            assert torch.equal(resumed["final"][g][k], v), (g, k)
    for key in ("eval_steps", "bpb", "bytes_up", "train_loss", "bytes_total"):
        assert resumed[key] == whole[key], key


@pytest.mark.parametrize("text,msg", [
    ("R=0 H=1", "R \\(replicas\\) must be >= 1"), ("R=2 H=0", "H \\(local steps per round\\)"),
    ("R=2 S=-1", "S \\(staleness"), ("R=2 c=topk:0", "density must be in"),
    ("R=2 outer=adam", "outer must be one of"), ("R=3 fam=text,dna", "do not split evenly"),
    ("R=2 H=x", "must be a whole number"), ("R=2 arrive=merge", "arrive must be one of"),
    ("R=2 Q=1", "unknown key"), ("R2", "KEY=VALUE"), ("R=2 ef=2", "ef is 0 or 1"),
])  # fmt: skip
def test_bad_arms(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_arm(text, 4, ["text"])


def test_steps_must_be_a_multiple_of_h(dm):
    with pytest.raises(ConfigError, match="multiple of H"):
        run_fleet(parse_arm("R=1 H=4", 1, ["text"]), _spec(6), dm, None)


@pytest.mark.parametrize("arm, want_deliveries", [
    ("R=2 H=2 S=0", 3),  # 6 steps = 3 rounds, each delivered
    ("R=2 H=2 S=1", 2),  # the last round's update would arrive after the run ends
    ("R=2 H=2 S=4", 0),  # none arrives
    ("sync R=2", 6),  # the all-reduced gradient, every step
])
def test_bytes_received_hand_computed(dm, arm, want_deliveries):
    rec = run_fleet(parse_arm(arm, 2, ["text"]), _spec(6), dm, None)
    params = sum(t.numel() for t in _init().values())
    assert rec["params"] == params
    assert rec["bytes_down"] == want_deliveries * 2 * 4 * params


@pytest.mark.parametrize("compression", ["topk:0.2", "topk:0.1+int4", "bitdelta", "lowrank:2"])
def test_error_feedback_sends_every_update_eventually(compression):
    """Σ decoded messages + the residual = Σ raw deltas (telescoping), while without error
    feedback the dropped part is lost."""
    from moe.experiments.fleet.fleet import Member

    gen = torch.Generator().manual_seed(0)
    raws = [{"w": torch.randn(8, 6, generator=gen, dtype=torch.float64),
             "b": torch.randn(6, generator=gen, dtype=torch.float64)} for _ in range(5)]
    fb = Member(None, None, None, None, "text", [])
    plain = Member(None, None, None, None, "text", [])
    sent = {n: torch.zeros_like(t) for n, t in raws[0].items()}
    lost = {n: torch.zeros_like(t) for n, t in raws[0].items()}
    for k, d in enumerate(raws):
        dec, _ = fb.send(d, compression, seed=k, ef=True)
        dec0, _ = plain.send(d, compression, seed=k, ef=False)
        for n in d:
            sent[n] += dec[n]
            lost[n] += d[n] - dec0[n]
    assert not plain.residual
    for n in sent:
        total = sum(d[n] for d in raws)
        torch.testing.assert_close(sent[n] + fb.residual[n], total, rtol=0, atol=1e-12)
    assert max(float(t.abs().max()) for t in lost.values()) > 1e-3  # compression drops some
