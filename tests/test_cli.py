"""The user's lifecycle through the `moe` command, on the debug recipes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEBUG

from moe.cli import main
from moe.io.checkpoint import load_checkpoint, read_meta

QUIET = ["trainer.enable_progress_bar=false"]


def run_cli(*args):
    """`moe ...` in a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "moe.cli", *map(str, args)], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_debug_run_lowers_heldout_loss_on_every_domain(debug_dense, tmp_path):
    init = tmp_path / "init"
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={init}", "trainer.max_steps=1",
                 "optim.lr=1e-9", *QUIET]) == 0
    assert main(["eval", str(init), str(debug_dense), "--json", str(tmp_path / "e.json")]) == 0
    before, after = json.loads((tmp_path / "e.json").read_text())
    for dom in ("text", "code", "dna"):
        assert after["domains"][dom]["loss"] < before["domains"][dom]["loss"] - 0.5, dom
        assert after["domains"][dom]["bpb"] > 0


def test_run_dir_has_recipe_logs_checkpoint_and_lineage(debug_dense):
    assert (debug_dense / "recipe.yaml").is_file()
    assert (debug_dense / "logs" / "metrics.csv").is_file()
    assert (debug_dense / "resume" / "last.ckpt").is_file()
    meta = read_meta(debug_dense / "model")
    assert meta["tokens_seen"] == 30 * 8 * 64
    assert meta["train_flops"] > 0 and meta["stage"]["steps"] == 30
    assert meta["recipe"]["data"]["seq_len"] == 64
    header = (debug_dense / "logs" / "metrics.csv").read_text().splitlines()[0]
    for col in ("train/loss", "train/loss_code", "val/bpb_dna"):
        assert col in header


def test_eval_writes_json_per_domain(debug_dense):
    assert main(["eval", str(debug_dense), "--domains", "code,dna", "--max-docs", "4"]) == 0
    rep = json.loads((debug_dense / "eval.json").read_text())
    assert set(rep["domains"]) == {"code", "dna"}
    d = rep["domains"]["dna"]
    assert d["bpb"] == pytest.approx(d["loss"] * d["tokens"] / d["bytes"] / 0.6931471805599453)


def test_overrides_restrict_domains(tmp_path):
    out = tmp_path / "r"
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={out}", "trainer.max_steps=3",
                 "data.domains=[code]", *QUIET]) == 0
    meta = read_meta(out / "model")
    assert meta["domain"] == "code" and meta["recipe"]["data"]["domains"] == ["code"]


def test_split_branch_assemble_router_joint(debug_dense, tmp_path):
    split = tmp_path / "split"
    assert main(["split", str(debug_dense), "--experts", "text,code,dna", "--method", "copy",
                 "--out", str(split)]) == 0
    branches = []
    for dom in ("code", "dna"):
        out = tmp_path / f"branch-{dom}"
        assert main(["train", str(DEBUG / "branch.yaml"), f"init={split}", f"branch.domain={dom}",
                     f"out_dir={out}", "trainer.max_steps=5", *QUIET]) == 0
        meta = read_meta(out / "model")
        assert meta["family"] == dom and meta["domain"] == dom and meta["kind"] == "branch"
        assert meta["recipe"]["data"]["domains"] == [dom]
        branches.append(out)
    btx = tmp_path / "btx"
    assert main(["assemble", *map(str, branches), "--out", str(btx), "--router-init",
                 "domain_mean"]) == 0
    ck = load_checkpoint(btx)
    assert ck.config.moe.experts == ["code", "dna"]
    for i, b in enumerate(branches):
        bsd = load_checkpoint(b / "model").state_dict
        assert torch.equal(ck.state_dict["layers.0.ffn.w1"][i], bsd["layers.0.ffn.w1.weight"].T)
    router = tmp_path / "router"
    assert main(["train", str(DEBUG / "router.yaml"), f"init={btx}", f"out_dir={router}",
                 "data.domains=[code,dna]", "trainer.max_steps=5", *QUIET]) == 0
    after = load_checkpoint(router / "model").state_dict
    for k, v in ck.state_dict.items():  # experts frozen: only routers moved
        assert torch.equal(v, after[k]) == (".router." not in k), k
    joint = tmp_path / "joint"
    assert main(["train", str(DEBUG / "joint.yaml"), f"out_dir={joint}", "trainer.max_steps=3",
                 *QUIET]) == 0
    assert main(["eval", str(joint), "--max-docs", "2"]) == 0
    rep = json.loads((joint / "eval.json").read_text())
    share = rep["routing"]["share"]["code"]
    assert all(layer == [0.0, 1.0, 0.0] for layer in share)


def test_data_command_describes_each_domain(capsys):
    assert main(["data", str(DEBUG / "dense.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["domain"] for r in rows] == ["text", "code", "dna"]
    for r in rows:
        assert r["bytes"] <= 120000 and r["heldout_documents"] >= 1 and r["origin"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,needle", [
    (["train", DEBUG / "dense.yaml", "model.dimm=3"], "unknown key 'model.dimm'"),
    (["train", DEBUG / "dense.yaml", "trainer.max_steps=many"], "trainer.max_steps"),
    (["train", "/no/such/recipe.yaml"], "recipe file not found"),
    (["train", DEBUG / "dense.yaml", "data.domains=[klingon]"], "unknown domain 'klingon'"),
    (["train", DEBUG / "dense.yaml", "data.seq_len=1000"], "larger than the model's context"),
    (["train", DEBUG / "dense.yaml", "data.sources.code.kind=files",
      "data.sources.code.paths=[/no/such/file.txt]"], "/no/such/file.txt"),
])
def test_bad_input_one_line_no_traceback(args, needle, tmp_path):
    rc, out, err = run_cli(*args, f"out_dir={tmp_path / 'x'}")
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "model").exists()


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(Exception, match="empty|no documents"):
        from moe.config import load_recipe
        from moe.train.stages import train

        train(load_recipe(DEBUG / "dense.yaml", [
            f"out_dir={tmp_path / 'x'}", "data.sources.text.kind=files",
            f"data.sources.text.paths=[{empty}]"]))


def test_existing_output_dir_refused_unless_overwrite(debug_dense, tmp_path):
    before = (debug_dense / "model" / "model.safetensors").read_bytes()
    rc, _, err = run_cli("train", DEBUG / "dense.yaml", f"out_dir={debug_dense}")
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert (debug_dense / "model" / "model.safetensors").read_bytes() == before


def test_corrupted_checkpoint_on_eval_and_resume(debug_dense, tmp_path):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(debug_dense / "model", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    rc, _, err = run_cli("eval", bad)
    assert rc == 2 and "model.safetensors" in err and "sha256" in err
    last = tmp_path / "last.ckpt"
    last.write_bytes((debug_dense / "resume" / "last.ckpt").read_bytes()[:1000])
    rc, _, err = run_cli("train", DEBUG / "dense.yaml", f"out_dir={tmp_path / 'r'}",
                         f"resume={last}")
    assert rc == 2 and "not a readable checkpoint" in err


def test_branch_stream_never_sees_another_domain(debug_dense, tmp_path):
    import itertools

    from moe.config import load_recipe
    from moe.data.datamodule import DomainDataModule
    from moe.surgery.experts import split_checkpoint
    from moe.train.stages import plan_stage

    split = split_checkpoint(debug_dense, tmp_path / "split", ["text", "code", "dna"])
    r = load_recipe(DEBUG / "branch.yaml", [f"init={split}", "branch.domain=dna"])
    plan = plan_stage(r)
    assert plan.data.domains == ["dna"] and plan.data.stream == "separate"
    dm = DomainDataModule(plan.data, seed=r.seed)
    dm.setup("fit")
    dna = dm.domain_id("dna")
    for batch in itertools.islice(iter(dm.train_dataloader()), 200):
        assert (batch["domain"] == dna).all()
        # DNA bytes only (upper-case bases, IUPAC letters) plus BOS/EOS
        toks = set(batch["input_ids"].unique().tolist())
        assert all(t >= 256 or chr(t) in "ACGTNRYKMSWBDHV" for t in toks), toks


def test_activation_split_on_real_data_preserves_the_dense_function(debug_dense, tmp_path):
    from moe.model.transformer import Transformer

    out = tmp_path / "act"
    assert main(["split", str(debug_dense), "--experts", "text,code,dna", "--method",
                 "activation", "--shared-dim", "24", "--calib-batches", "2", "--out",
                 str(out)]) == 0
    ck, dense_ck = load_checkpoint(out), load_checkpoint(debug_dense / "model")
    assert ck.meta["split"]["method"] == "activation" and ck.config.moe.shared_expert_ffn_dim == 24
    moe, dense = Transformer(ck.config).eval(), Transformer(dense_ck.config).eval()
    moe.load_state_dict(ck.state_dict)
    dense.load_state_dict(dense_ck.state_dict)
    for layer in moe.layers:
        layer.ffn.force_all_experts = True
    x = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=1e-4, rtol=1e-4)


def test_checkpoint_with_another_vocabulary_is_refused_for_eval_and_training(tmp_path):
    from moe.config import ModelConfig
    from moe.io.checkpoint import make_meta, save_checkpoint
    from moe.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=32000, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64)
    m = Transformer(cfg)
    ck = save_checkpoint(tmp_path / "llama", m.state_dict(), m.config, make_meta())
    # imported without a tokenizer: each command says which tokenizer to pass
    rc, _, err = run_cli("eval", ck)
    assert rc == 2 and "no tokenizer" in err and "--tokenizer PATH" in err
    rc, _, err = run_cli("train", DEBUG / "dense.yaml", f"init={ck}", f"out_dir={tmp_path / 'r'}")
    assert rc == 2 and "no tokenizer" in err and "data.tokenizer=PATH" in err


def test_a_closed_pipe_stops_quietly():
    """`moe ... | head`: the reader leaves before the output is written; no traceback."""
    from helpers import REPO

    p = subprocess.Popen([sys.executable, "-m", "moe.cli", "sweep",
                          str(REPO / "recipes" / "sweep.yaml"), "--dry-run"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the command has imported anything, let alone printed
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err
