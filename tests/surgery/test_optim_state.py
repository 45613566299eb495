"""moe/surgery/optim_state.py: a BTX MoE's AdamW state from its branches' runs (each expert its
branch's FFN moments, the shared weights the mean or the base's, the router zero), and
`optim.init_state` starting a training run from it."""

import dataclasses

import pytest
import torch
from helpers import DEBUG

from moe.config import ConfigError, OptimConfig, load_recipe
from moe.io.checkpoint import load_model
from moe.surgery.experts import assemble_checkpoints
from moe.surgery.optim_state import moe_adam_state, run_adam_state, write_moe_adam_state
from moe.train.init_state import load_adam_state, read_adam_state
from moe.train.module import LitLM
from moe.train.schedule import adamw_with_schedule, param_groups_by_name
from moe.train.stages import train

pytestmark = pytest.mark.slow

TINY = [
    "trainer.enable_progress_bar=false",
    "overwrite=true",
    "data.domains=[text,code]",
    "data.bytes_per_domain=20000",
    "data.seq_len=32",
    "data.batch_size=4",
    "model.dim=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_dim=48",
    "model.max_seq_len=64",
    "optim.warmup_steps=1",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=100",
    "trainer.checkpoint_every_n_steps=100",
]
EXPERTS = ["text", "code"]
STEPS = {"text": 5, "code": 6}  # per-branch final steps (AdamW's counts), seed forks at 3


def _train(out, recipe="dense.yaml", *over):
    return train(load_recipe(DEBUG / recipe, [*TINY, f"out_dir={out}", *over]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A seed, two branches forked from it (as a study's), and their BTX assemblies."""
    root = tmp_path_factory.mktemp("btx")
    seed = root / "seed"
    _train(seed, "dense.yaml", "trainer.max_steps=3")
    for dom in EXPERTS:
        _train(
            root / f"branch-{dom}",
            "dense.yaml",
            "stage=branch",
            f"branch.domain={dom}",
            f"trainer.max_steps={STEPS[dom]}",
            f"fork={seed}",
            f"init={seed / 'model'}",
        )
    branches = [root / f"branch-{d}" for d in EXPERTS]
    avg, base, gen = root / "btx-avg", root / "btx-base", root / "btx-gen"
    assemble_checkpoints([b / "model" for b in branches], avg, experts=EXPERTS)
    assemble_checkpoints(
        [b / "model" for b in branches], base, experts=EXPERTS, shared="base", base=seed / "model"
    )
    assemble_checkpoints(
        [b / "model" for b in branches], gen, experts=EXPERTS, generalist=seed / "model"
    )
    return dict(root=root, seed=seed, branches=branches, avg=avg, base=base, gen=gen)


def _ckpts(runs):
    return [b / "resume" / "last.ckpt" for b in runs["branches"]]


def test_experts_shared_and_router_of_an_averaged_btx(runs):
    state = moe_adam_state(_ckpts(runs), runs["avg"], EXPERTS, "average")
    moe = load_model(runs["avg"]).model
    assert list(state) == [n for n, _ in moe.named_parameters()]
    own = [run_adam_state(c)[0] for c in _ckpts(runs)]
    for name, p in moe.named_parameters():
        st = state[name]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert st["step"].dtype == torch.float32 and st["step"].ndim == 0
        if name.endswith(("ffn.w1", "ffn.w3", "ffn.w2")):
            for e in range(len(EXPERTS)):  # (a) expert e is branch e's FFN, transposed, exactly
                dense = own[e][name + ".weight"]
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(st[k][e], dense[k].T), (name, e, k)
            assert float(st["step"]) == sum(STEPS.values()) / 2  # the branches' mean step
        elif ".router." in name:  # (c) the new router: zero moments, a fresh step count
            assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
            assert float(st["step"]) == 0.0
        else:  # (b) shared weights: the branches' mean
            for k in ("exp_avg", "exp_avg_sq"):
                want = torch.stack([o[name][k].double() for o in own]).mean(0).float()
                assert torch.equal(st[k], want), (name, k)
            assert float(st["step"]) == sum(STEPS.values()) / 2
    # the moments are the branches' own: the expert slices of the two branches differ
    w1 = state["layers.0.ffn.w1"]["exp_avg"]
    assert not torch.equal(w1[0], w1[1])


def test_shared_base_takes_the_seeds_moments(runs):
    state = moe_adam_state(
        _ckpts(runs), runs["base"], EXPERTS, "base", base_ckpt=runs["seed"] / "resume" / "last.ckpt"
    )
    seed = run_adam_state(runs["seed"])[0]  # a run directory works too
    own0 = run_adam_state(_ckpts(runs)[0])[0]
    for name, st in state.items():
        if ".ffn." in name:
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], seed[name][k]), (name, k)
            assert not torch.equal(st[k], own0[name][k])
        assert float(st["step"]) == 3.0
    with pytest.raises(ConfigError, match="needs base_ckpt"):
        moe_adam_state(_ckpts(runs), runs["base"], EXPERTS, "base")
    with pytest.raises(ConfigError, match="assembled with shared=base"):
        moe_adam_state(_ckpts(runs), runs["base"], EXPERTS, "average")


def test_generalist_expert_comes_from_the_seeds_run(runs):
    seed_ckpt = runs["seed"] / "resume" / "last.ckpt"
    state = moe_adam_state(_ckpts(runs), runs["gen"], EXPERTS, "average", generalist_ckpt=seed_ckpt)
    seed = run_adam_state(seed_ckpt)[0]
    own = [run_adam_state(c)[0] for c in _ckpts(runs)] + [seed]
    w2 = state["layers.1.ffn.w2"]
    assert w2["exp_avg"].shape[0] == 3
    assert torch.equal(w2["exp_avg_sq"][2], seed["layers.1.ffn.w2.weight"]["exp_avg_sq"].T)
    # assembly averages the generalist into the shared weights; so do the moments
    want = torch.stack([o["norm.weight"]["exp_avg"].double() for o in own]).mean(0).float()
    torch.testing.assert_close(state["norm.weight"]["exp_avg"], want, rtol=1e-6, atol=0)
    assert float(w2["step"]) == pytest.approx((sum(STEPS.values()) + 3) / 3)
    with pytest.raises(ConfigError, match="experts"):  # the generalist must be named
        moe_adam_state(_ckpts(runs), runs["gen"], EXPERTS, "average")


def test_load_into_an_optimizer_and_the_writer(runs, tmp_path):
    out = write_moe_adam_state(
        _ckpts(runs), runs["avg"], EXPERTS, "average", out=tmp_path / "adam.pt"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adam.pt"]  # no staging leftovers
    state = read_adam_state(out)
    moe = load_model(runs["avg"]).model
    opt, _ = adamw_with_schedule(moe, OptimConfig(), 10)
    load_adam_state(opt, moe, state)
    params = dict(moe.named_parameters())
    for name, st in state.items():
        got = opt.state[params[name]]
        assert torch.equal(got["exp_avg"], st["exp_avg"]) and torch.equal(got["step"], st["step"])
    # the optimizer's own state_dict lays the loaded moments out by group, as a run saves them
    sd = opt.state_dict()
    decay, no_decay = param_groups_by_name(moe)
    idx = sd["param_groups"][1]["params"][no_decay.index("norm.weight")]
    assert torch.equal(sd["state"][idx]["exp_avg_sq"], state["norm.weight"]["exp_avg_sq"])
    # a wrong shape or a missing name: one line each
    bad = dict(state, **{"norm.weight": dict(state["norm.weight"], exp_avg=torch.zeros(3))})
    with pytest.raises(ConfigError, match=r"exp_avg of norm.weight is \[3\]") as e:
        load_adam_state(opt, moe, bad)
    assert "\n" not in str(e.value)
    short = {k: v for k, v in state.items() if k != "tok_emb.weight"}
    with pytest.raises(ConfigError, match="no AdamW state for tok_emb.weight"):
        load_adam_state(opt, moe, short)


def test_a_run_with_init_state_starts_from_those_moments(runs, tmp_path):
    """(d) The MoE's fine-tune (experts frozen: their state is never stepped) saves exactly the
    loaded moments for the experts; the trained router's step count went on from 0."""
    path = write_moe_adam_state(
        _ckpts(runs), runs["avg"], EXPERTS, "average", out=tmp_path / "adam.pt"
    )
    state = read_adam_state(path)
    _train(
        tmp_path / "moe",
        "router.yaml",
        f"init={runs['avg']}",
        "trainer.max_steps=1",
        f"optim.init_state={path}",
    )
    ck = torch.load(tmp_path / "moe" / "resume" / "last.ckpt", weights_only=True)
    moe = load_model(runs["avg"]).model
    saved = ck["optimizer_states"][0]
    names = [n for g in param_groups_by_name(moe) for n in g]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    by_name = {n: saved["state"].get(i) for n, i in zip(names, ids)}
    for name in ("layers.0.ffn.w1", "layers.1.ffn.w2", "tok_emb.weight", "norm.weight"):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(by_name[name][k], state[name][k]), (name, k)
    assert float(by_name["layers.0.ffn.router.weight"]["step"]) == 1.0
    assert by_name["layers.0.ffn.router.weight"]["exp_avg"].any()
    # a fresh run's frozen parameters would have no state at all
    _train(tmp_path / "fresh", "router.yaml", f"init={runs['avg']}", "trainer.max_steps=1")
    fresh = torch.load(tmp_path / "fresh" / "resume" / "last.ckpt", weights_only=True)
    assert len(fresh["optimizer_states"][0]["state"]) < len(saved["state"])
    # a resume continues its own checkpoint's state: the file is not loaded over it again
    _train(
        tmp_path / "moe",
        "router.yaml",
        f"init={runs['avg']}",
        "trainer.max_steps=2",
        f"optim.init_state={path}",
        f"resume={tmp_path / 'moe'}",
    )
    ck = torch.load(tmp_path / "moe" / "resume" / "last.ckpt", weights_only=True)
    router = names.index("layers.0.ffn.router.weight")
    assert float(ck["optimizer_states"][0]["state"][ids[router]]["step"]) == 2.0


def test_missing_or_unusable_files_are_one_line_errors(runs, tmp_path):
    # (e) a missing init_state: refused before the run directory is made
    with pytest.raises(ConfigError, match="optim.init_state: no optimizer state file") as e:
        _train(
            tmp_path / "moe",
            "router.yaml",
            f"init={runs['avg']}",
            "trainer.max_steps=1",
            f"optim.init_state={tmp_path / 'nope.pt'}",
        )
    assert "\n" not in str(e.value)
    assert not (tmp_path / "moe").exists()
    # a file for another model (the dense seed's parameters are not the MoE's)
    moe = load_model(runs["avg"]).model
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a readable torch file"):
        read_adam_state(tmp_path / "junk.pt")
    other = {
        n: {"exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1), "step": torch.tensor(0.0)}
        for n in ("a.weight",)
    }
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no AdamW state for tok_emb.weight"):
        LitLM(
            moe,
            dataclasses.replace(OptimConfig(), init_state=str(tmp_path / "other.pt")),
            EXPERTS,
            max_steps=1,
            seq_len=32,
        )
    # a Lightning checkpoint without optimizer state
    ck = torch.load(_ckpts(runs)[0], weights_only=True)
    ck.pop("optimizer_states")
    (tmp_path / "b" / "resume").mkdir(parents=True)
    torch.save(ck, tmp_path / "b" / "resume" / "last.ckpt")
    import shutil

    shutil.copytree(runs["branches"][0] / "model", tmp_path / "b" / "model")
    with pytest.raises(ConfigError, match="holds no optimizer state") as e:
        moe_adam_state(
            [tmp_path / "b" / "resume" / "last.ckpt", _ckpts(runs)[1]],
            runs["avg"],
            EXPERTS,
            "average",
        )
    assert "\n" not in str(e.value)
    # the experts named in another order than the MoE's
    with pytest.raises(ConfigError, match=r"has the experts \['text', 'code'\]"):
        moe_adam_state(_ckpts(runs)[::-1], runs["avg"], EXPERTS[::-1], "average")


def test_a_shared_expert_takes_the_mean_of_the_branches_first_neurons(runs, tmp_path):
    """Branches of an activation split with a shared expert (Fs neurons in front of each branch's
    FFN): the shared expert's moments are the mean of those neurons', the experts' the rest."""
    from moe.surgery.experts import split_checkpoint

    fs = 8
    split = split_checkpoint(
        runs["seed"] / "model",
        tmp_path / "split",
        EXPERTS,
        method="activation",
        shared_dim=fs,
        calib_batches=1,
    )
    for dom in EXPERTS:
        _train(
            tmp_path / f"branch-{dom}",
            "dense.yaml",
            "stage=branch",
            f"branch.domain={dom}",
            "trainer.max_steps=2",
            f"init={split}",
        )
    ckpts = [tmp_path / f"branch-{d}" / "resume" / "last.ckpt" for d in EXPERTS]
    moe_dir = assemble_checkpoints(
        [tmp_path / f"branch-{d}" / "model" for d in EXPERTS], tmp_path / "btx", experts=EXPERTS
    )
    state = moe_adam_state(ckpts, moe_dir, EXPERTS, "average")
    own = [run_adam_state(c)[0] for c in ckpts]
    for w in ("w1", "w3", "w2"):
        dense = [o[f"layers.1.ffn.{w}.weight"]["exp_avg_sq"] for o in own]
        front = [d[:, :fs] if w == "w2" else d[:fs] for d in dense]
        want = torch.stack([f.double() for f in front]).mean(0).float()
        assert torch.equal(state[f"layers.1.ffn.shared.{w}.weight"]["exp_avg_sq"], want), w
        for e, d in enumerate(dense):
            rest = d[:, fs:] if w == "w2" else d[fs:]
            assert torch.equal(state[f"layers.1.ffn.{w}"]["exp_avg_sq"][e], rest.T), (w, e)
