"""The bad-input catalogue: one table shared by tests/test_bad_input.py and
tools/bad_input_catalogue.py (which prints it as the table in docs/reliability.md).

Each case is a `moe` command line built from fixtures (`build_fixtures`) and the substring its
one-line message must contain. `accepted` cases are inputs that look wrong but are valid on
purpose (bytes-level text, IUPAC DNA letters): they must succeed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "recipes" / "debug"
QUIET = "trainer.enable_progress_bar=false"


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what is wrong, in words (the catalogue's "input" column)
    argv: Callable[[dict[str, Path]], list[str]]
    expect: str  # substring of the message ("" for accepted cases)
    accepted: bool = False  # valid on purpose: must exit 0
    subprocess: bool = False  # also run through `python -m moe.cli` in the test


def _train(fx, *over, recipe="dense.yaml"):
    return ["train", str(DEBUG / recipe), f"out_dir={fx['tmp'] / 'new-run'}", QUIET,
            "trainer.max_steps=1", *over]


def _files(fx, dom, path, *over):
    return _train(fx, f"data.domains=[{dom}]", f"data.sources.{dom}.kind=files",
                  f"data.sources.{dom}.paths=[{path}]", *over)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _gen_fx(name, path):
    """A small checkpoint from tests/generate_fixtures.py, built in the case's scratch dir
    (once: the catalogue tool asks for the command line again after running it)."""
    import generate_fixtures

    return path if path.exists() else getattr(generate_fixtures, name)(path)


def _tok_fx(fx, what):
    """Tokenizer fixtures (tests/tokenizer_fixtures.py), built in the case's scratch dir."""
    import tokenizer_fixtures as t

    root = fx["tmp"] / "tok"
    if what == "tok":
        return t.bpe_tokenizer(root / "tok-a")
    a, b = t.two_tokenizer_checkpoints(root)
    return {"a": a, "b": b, "merge": t.merge_yaml(root, a, b)}[what]


def _study(fx, *over):
    return ["run", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'study'}", QUIET, *over]


def _merge_yaml(fx, name):
    return ["merge", str(fx["merge"] / f"{name}.yaml"), "--out", str(fx["tmp"] / "merged")]


CASES: list[Case] = [
    # ------------------------------------------------------------------ recipes
    Case("recipe-unknown-key-top", "recipe: unknown top-level key",
         lambda fx: _train(fx, "epochs=3"), "epochs", subprocess=True),
    Case("recipe-unknown-key-nested", "recipe: unknown nested key (typo)",
         lambda fx: _train(fx, "optim.learning_rate=0.1"), "learning_rate"),
    Case("recipe-wrong-type-int", "recipe: int field given a string",
         lambda fx: _train(fx, "trainer.max_steps=many"), "max_steps"),
    Case("recipe-wrong-type-list", "recipe: list field given a scalar",
         lambda fx: _train(fx, "data.domains=text"), "data.domains"),
    Case("recipe-section-list", "recipe: a section given a list (`model: [1, 2]`)",
         lambda fx: ["train", str(fx["recipes"] / "section_list.yaml")],
         "'model' must be a mapping (section), got a list"),
    Case("override-section-list", "override: a section given a list (`model=[1,2]`)",
         lambda fx: _train(fx, "model=[1,2]"), "'model' must be a mapping (section), got a list",
         subprocess=True),
    Case("override-section-scalar", "override: a section given a scalar (`data=5`)",
         lambda fx: _train(fx, "data=5"), "'data' must be a mapping (section), got 5"),
    Case("override-section-null", "override: a section set to null",
         lambda fx: _train(fx, "data=null"), "'data' must be a mapping (section), got null"),
    Case("override-list-mapping", "override: a list field given a mapping",
         lambda fx: _train(fx, "data.domains={text: 1}"),
         "'data.domains' must be a list, got a mapping"),
    Case("override-scalar-list", "override: a number field given a list",
         lambda fx: _train(fx, "optim.lr=[0.1]"), "'optim.lr' must be a number, got a list"),
    Case("override-sources-list", "override: data.sources (per-domain sections) given a list",
         lambda fx: _train(fx, "data.sources=[text]"), "'data.sources' must be a mapping, got"),
    Case("recipe-lr-nan", "recipe: `optim.lr: .nan`",
         lambda fx: ["train", str(fx["recipes"] / "lr_nan.yaml")],
         "optim.lr must be a finite number, got nan"),
    Case("override-lr-inf", "override: optim.lr=inf",
         lambda fx: _train(fx, "optim.lr=inf"), "optim.lr must be a finite number, got inf"),
    Case("override-lr-neg-inf", "override: optim.lr=-inf",
         lambda fx: _train(fx, "optim.lr=-inf"), "optim.lr must be a finite number, got -inf"),
    Case("override-weights-nan", "override: a data.weights entry is NaN",
         lambda fx: _train(fx, "data.weights={text: .nan, code: 1.0}"),
         "data.weights.text must be a finite number, got nan"),
    Case("recipe-missing-file", "recipe file does not exist",
         lambda fx: ["train", str(fx["tmp"] / "nope.yaml")], "recipe file not found"),
    Case("recipe-bad-yaml", "recipe is not valid YAML",
         lambda fx: ["train", str(fx["recipes"] / "bad.yaml")], "not valid YAML"),
    Case("recipe-not-mapping", "recipe is a YAML list, not a mapping",
         lambda fx: ["train", str(fx["recipes"] / "list.yaml")], "must be a mapping"),
    Case("recipe-defaults-cycle", "recipe `defaults` include each other in a cycle",
         lambda fx: ["train", str(fx["recipes"] / "cycle_a.yaml")], "cycle"),
    Case("recipe-non-utf8", "recipe file is not UTF-8 (Latin-1 bytes)",
         lambda fx: ["train", str(fx["recipes"] / "latin1.yaml")], "latin1.yaml"),
    Case("override-no-equals", "override without `=`",
         lambda fx: _train(fx, "trainer.max_steps"), "not of the form key=value"),
    Case("unknown-domain", "data.domains names an unknown domain",
         lambda fx: _train(fx, "data.domains=[klingon]"), "klingon"),
    Case("unknown-stage", "recipe stage: unknown",
         lambda fx: _train(fx, "stage=pretrain"), "unknown stage"),
    Case("seq-len-zero", "zero-length sequences (data.seq_len=0)",
         lambda fx: _train(fx, "data.seq_len=0"), "data.seq_len must be at least 2"),
    Case("seq-len-one", "one-token sequences (data.seq_len=1)",
         lambda fx: _train(fx, "data.seq_len=1"), "data.seq_len must be at least 2"),
    Case("seq-len-over-context", "data.seq_len larger than the model's context",
         lambda fx: _train(fx, "data.seq_len=4096"), "max_seq_len"),
    Case("batch-size-zero", "data.batch_size=0",
         lambda fx: _train(fx, "data.batch_size=0"), "batch_size"),
    Case("heldout-fraction", "data.heldout_fraction=1.5",
         lambda fx: _train(fx, "data.heldout_fraction=1.5"), "heldout_fraction"),
    Case("max-steps-zero", "trainer.max_steps=0",
         lambda fx: _train(fx, "trainer.max_steps=0"), "max_steps"),
    Case("nan-policy-unknown", "trainer.nan_policy=ignore",
         lambda fx: _train(fx, "trainer.nan_policy=ignore"), "nan_policy"),
    Case("moe-top-k-zero", "model.moe.top_k=0 in a recipe",
         lambda fx: _train(fx, "model.moe.top_k=0", recipe="joint.yaml"), "top_k"),
    Case("moe-top-k-over", "model.moe.top_k larger than the number of experts",
         lambda fx: _train(fx, "model.moe.top_k=9", "model.moe.router=learned",
                           recipe="joint.yaml"), "top_k"),
    Case("study-top-k-over", "study.router_top_k larger than the number of experts",
         lambda fx: ["run", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'study'}",
                     "study.router_top_k=9"], "router_top_k"),
    # ------------------------------------------------------------------ data
    Case("corpus-empty", "files source is an empty .txt",
         lambda fx: _files(fx, "text", fx["data"] / "empty.txt"), "text"),
    Case("corpus-missing", "files source path does not exist",
         lambda fx: _files(fx, "text", fx["data"] / "missing.txt"), "no file matches"),
    Case("corpus-unsupported-type", "files source with an unsupported extension",
         lambda fx: _files(fx, "text", fx["data"] / "corpus.docx"), "unsupported file type"),
    Case("corpus-non-utf8-text", "text corpus with non-UTF-8 bytes (Latin-1)",
         lambda fx: _files(fx, "text", fx["data"] / "latin1.txt"), "", accepted=True),
    Case("dna-iupac", "DNA FASTA with IUPAC letters (N, R, Y, ...)",
         lambda fx: _files(fx, "dna", fx["data"] / "iupac.fa"), "", accepted=True),
    Case("dna-no-header", "FASTA with no `>` header line",
         lambda fx: _files(fx, "dna", fx["data"] / "noheader.fa"), "not FASTA"),
    Case("dna-binary", "FASTA file holding binary garbage",
         lambda fx: _files(fx, "dna", fx["data"] / "garbage.fa"), "garbage.fa"),
    Case("corpus-gz-text", "text corpus gzipped (.txt.gz): read decompressed",
         lambda fx: _files(fx, "text", fx["data"] / "plays.txt.gz"), "", accepted=True),
    Case("corpus-gz-jsonl", "JSON-lines corpus gzipped (.jsonl.gz): read decompressed",
         lambda fx: _files(fx, "text", fx["data"] / "rows.jsonl.gz"), "", accepted=True),
    Case("corpus-binary-text", "text corpus holding binary data (.txt)",
         lambda fx: _files(fx, "text", fx["data"] / "noise.txt"), "binary data, not text"),
    Case("corpus-gz-not-gzip", "text corpus named .gz that is not gzip data",
         lambda fx: _files(fx, "text", fx["data"] / "plain.txt.gz"), "not gzip data"),
    Case("corpus-gz-truncated", "gzipped text corpus cut short",
         lambda fx: _files(fx, "text", fx["data"] / "cut.txt.gz"), "unreadable gzip data"),
    Case("corpus-bz2", "text corpus compressed with bzip2 (.txt.bz2)",
         lambda fx: _files(fx, "text", fx["data"] / "plays.txt.bz2"), "bzip2 files are not read"),
    # ------------------------------------------------------------------ checkpoints
    Case("eval-truncated-weights", "eval: model.safetensors truncated",
         lambda fx: ["eval", str(fx["trunc"])], "model.safetensors", subprocess=True),
    Case("eval-corrupted-meta", "eval: meta.json is not JSON",
         lambda fx: ["eval", str(fx["badmeta"])], "meta.json"),
    Case("eval-config-unknown-key", "eval: config.json with an unknown key",
         lambda fx: ["eval", str(fx["badcfg"])], "config.json"),
    Case("eval-not-checkpoint", "eval: a directory that is not a checkpoint",
         lambda fx: ["eval", str(fx["notckpt"])], "neither a checkpoint nor a run directory"),
    Case("eval-missing-path", "eval: path does not exist",
         lambda fx: ["eval", str(fx["tmp"] / "nowhere")], "no such checkpoint"),
    Case("eval-unknown-domain", "eval --domains klingon",
         lambda fx: ["eval", str(fx["dense"]), "--domains", "klingon"], "klingon"),
    Case("eval-batch-size-zero", "eval --batch-size 0",
         lambda fx: ["eval", str(fx["dense"]), "--batch-size", "0"], "batch"),
    Case("eval-json-is-dir", "eval --json pointing at an existing directory",
         lambda fx: ["eval", str(fx["dense"]), "--json", str(fx["notckpt"])], "not-a-checkpoint"),
    Case("eval-data-no-files", "eval --data DOMAIN=GLOB matching no file",
         lambda fx: ["eval", str(fx["dense"]), "--data", f"text={fx['tmp']}/none/*.txt.gz"],
         "no file matches"),
    Case("eval-data-bad-spec", "eval --data naming neither a recipe nor DOMAIN=PATH",
         lambda fx: ["eval", str(fx["dense"]), "--data", "nowhere.yaml"], "neither a recipe"),
    Case("eval-no-tokenizer", "eval: non-byte vocabulary imported without a tokenizer",
         lambda fx: ["eval", str(_gen_fx("no_tokenizer_checkpoint", fx["tmp"] / "v300"))],
         "--tokenizer PATH"),
    Case("init-unknown-method", "moe init --method naming no init method",
         lambda fx: ["init", "--from", str(fx["dense"]), "--method", "magic",
                     "--out", str(fx["tmp"] / "init-out")], "unknown method 'magic'"),
    Case("init-other-shape", "moe init: a same-shape method (histogram) to another architecture",
         lambda fx: ["init", "--from", str(fx["dense"]), "--method", "histogram", "model.dim=32",
                     "--out", str(fx["tmp"] / "init-out")], "needs the source's architecture"),
    Case("init-select-larger", "moe init --method select to a larger target",
         lambda fx: ["init", "--from", str(fx["dense"]), "--method", "select", "model.dim=128",
                     "--out", str(fx["tmp"] / "init-out")], "larger than the source's"),
    Case("init-source-hash", "moe init --from a checkpoint whose weights fail their sha256",
         lambda fx: ["init", "--from", str(fx["trunc"]), "--method", "shuffle",
                     "--out", str(fx["tmp"] / "init-out")], "sha256 mismatch"),
    Case("init-no-tokenizer", "train init= a checkpoint imported without a tokenizer",
         lambda fx: _train(fx, f"init={_gen_fx('no_tokenizer_checkpoint', fx['tmp'] / 'v300')}"),
         "data.tokenizer=PATH"),
    Case("init-other-tokenizer", "train init= a byte checkpoint with data.tokenizer= a BPE one",
         lambda fx: _train(fx, f"init={fx['dense']}", f"data.tokenizer={_tok_fx(fx, 'tok')}"),
         "is another one"),
    Case("tokenizer-larger-than-model", "data.tokenizer with more tokens than model.vocab_size",
         lambda fx: _train(fx, f"data.tokenizer={_tok_fx(fx, 'tok')}"),
         "more than the model's embedding"),
    Case("data-tokenizer-missing", "data.tokenizer= a path that does not exist",
         lambda fx: _train(fx, f"data.tokenizer={fx['tmp'] / 'no-tok'}"), "data.tokenizer"),
    Case("merge-tokenizer-mismatch", "merge: checkpoints with different tokenizers",
         lambda fx: ["merge", str(_tok_fx(fx, "merge")), "--out", str(fx["tmp"] / "merged")],
         "different tokenizers"),
    Case("assemble-tokenizer-mismatch", "assemble: branches with different tokenizers",
         lambda fx: ["assemble", str(_tok_fx(fx, "a")), str(_tok_fx(fx, "b")), "--out",
                     str(fx["tmp"] / "btx")], "different tokenizers"),
    Case("init-not-checkpoint", "train init= a directory that is not a checkpoint",
         lambda fx: _train(fx, f"init={fx['notckpt']}"), "not-a-checkpoint"),
    Case("init-moe-dense-stage", "stage=dense with init= an MoE checkpoint",
         lambda fx: _train(fx, f"init={fx['moe']}"), "stage=dense got an MoE"),
    Case("out-dir-is-file", "out_dir is an existing file",
         lambda fx: ["train", str(DEBUG / "dense.yaml"), f"out_dir={fx['data'] / 'empty.txt'}"],
         "not a directory"),
    Case("data-weights-negative", "data.weights with a negative weight",
         lambda fx: _train(fx, "data.weights={text: -1.0, code: 1.0}"), "data.weights"),
    Case("init-truncated-weights", "train init= a checkpoint with truncated weights",
         lambda fx: _train(fx, f"init={fx['trunc']}"), "model.safetensors"),
    Case("resume-missing", "resume= a file that does not exist",
         lambda fx: _train(fx, f"resume={fx['tmp'] / 'none.ckpt'}"), "no Lightning checkpoint"),
    Case("resume-pickled-object", "resume= a .ckpt holding a pickled object (code on load)",
         lambda fx: _train(fx, f"resume={fx['evil_ckpt']}"), "holds pickled Python objects"),
    Case("resume-truncated", "resume= a truncated .ckpt",
         lambda fx: _train(fx, f"resume={fx['trunc_ckpt']}"), "not a readable checkpoint"),
    # ------------------------------------------------------------------ split / assemble
    Case("split-unknown-method", "split --method nonsense",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,code", "--method", "nonsense",
                     "--out", str(fx["tmp"] / "s")], "--method", subprocess=True),
    Case("split-missing-experts", "split without the required --experts",
         lambda fx: ["split", str(fx["dense"]), "--out", str(fx["tmp"] / "s")], "--experts"),
    Case("split-shared-dim-copy", "split --shared-dim with the copy method",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,code", "--shared-dim", "16",
                     "--out", str(fx["tmp"] / "s")], "activation split only"),
    Case("split-duplicate-experts", "split --experts text,text",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,text",
                     "--out", str(fx["tmp"] / "s")], "distinct"),
    Case("split-top-k-over", "split --top-k 9 with 3 experts",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,code,dna", "--top-k", "9",
                     "--out", str(fx["tmp"] / "s")], "--top-k 9"),
    Case("split-top-k-zero", "split --top-k 0",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,code,dna", "--top-k", "0",
                     "--out", str(fx["tmp"] / "s")], "--top-k: must be between 1"),
    Case("split-moe", "split of a checkpoint that is already an MoE",
         lambda fx: ["split", str(fx["moe"]), "--experts", "text,code",
                     "--out", str(fx["tmp"] / "s")], "already an MoE"),
    Case("assemble-other-base", "assemble: one branch from a different base model",
         lambda fx: ["assemble", str(fx["branch_text"]), str(fx["branch_other"]),
                     "--out", str(fx["tmp"] / "a")], "different base"),
    Case("assemble-shapes", "assemble: branches with mismatched shapes",
         lambda fx: ["assemble", str(fx["branch_text"]), str(fx["branch_small"]),
                     "--out", str(fx["tmp"] / "a")], "branch"),
    Case("assemble-duplicate-domain", "assemble: two branches of the same domain",
         lambda fx: ["assemble", str(fx["branch_text"]), str(fx["branch_text"]),
                     "--out", str(fx["tmp"] / "a")], "same expert"),
    Case("assemble-top-k-over", "assemble --top-k 5 with 2 branches",
         lambda fx: ["assemble", str(fx["branch_text"]), str(fx["branch_code"]), "--top-k", "5",
                     "--out", str(fx["tmp"] / "a")], "--top-k 5"),
    # ------------------------------------------------------------------ merge configs
    Case("merge-unknown-key", "merge config: unknown key",
         lambda fx: _merge_yaml(fx, "unknown_key"), "merge_mthod"),
    Case("merge-unknown-method", "merge config: unknown merge_method",
         lambda fx: _merge_yaml(fx, "unknown_method"), "frankenmerge"),
    Case("merge-slerp-three", "merge config: slerp with 3 models",
         lambda fx: _merge_yaml(fx, "slerp3"), "exactly two models"),
    Case("merge-density-zero", "merge config: density 0",
         lambda fx: _merge_yaml(fx, "density0"), "density must be in (0, 1]"),
    Case("merge-density-two", "merge config: density 2",
         lambda fx: _merge_yaml(fx, "density2"), "density must be in (0, 1]"),
    Case("merge-missing-model", "merge config: model path does not exist",
         lambda fx: _merge_yaml(fx, "missing_model"), "no-such-model"),
    Case("merge-shapes", "merge config: models of different shapes",
         lambda fx: _merge_yaml(fx, "shapes"), "differs"),
    Case("merge-cross-family", "merge config: two expert families, no allow_cross_family",
         lambda fx: _merge_yaml(fx, "cross_family"), "allow_cross_family"),
    Case("merge-slerp-no-t", "merge config: slerp without parameters.t",
         lambda fx: _merge_yaml(fx, "slerp_no_t"), "needs t"),
    Case("merge-not-mapping", "merge config is a YAML list",
         lambda fx: _merge_yaml(fx, "list"), "must be a mapping"),
    Case("merge-parameters-list", "merge config: `parameters:` given a list",
         lambda fx: _merge_yaml(fx, "parameters_list"),
         "'parameters' must be a mapping (section), got a list"),
    Case("merge-models-mapping", "merge config: `models:` given a mapping",
         lambda fx: _merge_yaml(fx, "models_mapping"), "'models' must be a list, got a mapping"),
    Case("merge-weight-nan", "merge config: a model's weight is .nan",
         lambda fx: _merge_yaml(fx, "weight_nan"),
         "models[0].parameters.weight must be a finite number, got nan"),
    Case("merge-lambda-inf", "merge config: parameters.lambda is .inf",
         lambda fx: _merge_yaml(fx, "lambda_inf"),
         "parameters.lambda must be a finite number, got inf"),
    Case("merge-t-nan", "merge config: slerp with t: .nan",
         lambda fx: _merge_yaml(fx, "t_nan"), "parameters.t must be a finite number, got nan"),
    Case("merge-non-utf8", "merge config file is not UTF-8",
         lambda fx: _merge_yaml(fx, "latin1"), "latin1.yaml"),
    Case("merge-truncated-input", "merge: an input's model.safetensors truncated",
         lambda fx: _merge_yaml(fx, "truncated"), "model.safetensors"),
    # ------------------------------------------------------------------ import / export
    Case("import-no-config", "import: directory without config.json",
         lambda fx: ["import", str(fx["hf_noconfig"]), "--out", str(fx["tmp"] / "i")],
         "config.json"),
    Case("import-not-llama", "import: a non-Llama architecture",
         lambda fx: ["import", str(fx["hf_gpt2"]), "--out", str(fx["tmp"] / "i")],
         "only Llama-family"),
    Case("import-missing-dir", "import of a directory that does not exist",
         lambda fx: ["import", str(fx["tmp"] / "nothing"), "--out", str(fx["tmp"] / "i")],
         "nothing"),
    Case("export-domain-router", "export of an MoE with a domain router",
         lambda fx: ["export", str(fx["moe_domain"]), "--out", str(fx["tmp"] / "e")], "domain"),
    # ------------------------------------------------------------------ existing outputs
    Case("exists-train", "train into an existing run directory without --overwrite",
         lambda fx: ["train", str(DEBUG / "dense.yaml"), f"out_dir={fx['dense']}", QUIET],
         "already exists"),
    Case("exists-split", "split --out an existing directory",
         lambda fx: ["split", str(fx["dense"]), "--experts", "text,code",
                     "--out", str(fx["moe"])], "already exists"),
    Case("exists-assemble", "assemble --out an existing directory",
         lambda fx: ["assemble", str(fx["branch_text"]), str(fx["branch_code"]),
                     "--out", str(fx["moe"])], "already exists"),
    Case("exists-merge", "merge --out an existing directory",
         lambda fx: ["merge", str(fx["merge"] / "ok.yaml"), "--out", str(fx["moe"])],
         "already exists"),
    Case("exists-import", "import --out an existing directory",
         lambda fx: ["import", str(fx["hf_dense"]), "--out", str(fx["moe"])], "already exists"),
    Case("exists-export", "export --out an existing directory",
         lambda fx: ["export", str(fx["dense"]), "--out", str(fx["hf_dense"])],
         "already exists"),
    # ------------------------------------------------------------------ generate
    Case("gen-prompt-over-context", "generate: prompt longer than the model's context",
         lambda fx: ["generate", str(fx["dense"]), "--prompt-file",
                     _write(fx["tmp"] / "long.txt", b"x" * 300)], "context"),
    Case("gen-temperature-zero", "generate --temperature 0 (sampling)",
         lambda fx: ["generate", str(fx["dense"]), "--temperature", "0"], "temperature",
         subprocess=True),
    Case("gen-top-p-over-one", "generate --top-p 1.5",
         lambda fx: ["generate", str(fx["dense"]), "--top-p", "1.5"], "top-p"),
    Case("gen-domain-not-expert", "generate --domain that is not an expert of the model",
         lambda fx: ["generate", str(fx["moe_domain"]), "--domain", "klingon"], "klingon"),
    Case("gen-domain-missing", "generate with a domain-routed MoE and no --domain",
         lambda fx: ["generate", str(fx["moe_domain"])], "--domain"),
    Case("gen-html-missing-dir", "generate --html in a directory that does not exist",
         lambda fx: ["generate", str(fx["moe"]), "--html", str(fx["tmp"] / "no-dir" / "r.html")],
         "no-dir"),
    Case("gen-prompt-unencodable", "generate: prompt the checkpoint's tokenizer cannot encode",
         lambda fx: ["generate", str(_gen_fx("word_checkpoint", fx["tmp"] / "words")),
                     "--prompt", "hello klingon"], "cannot encode"),
    Case("gen-vocab-no-tokenizer", "generate: non-byte vocabulary and no tokenizer with it",
         lambda fx: ["generate", str(_gen_fx("no_tokenizer_checkpoint", fx["tmp"] / "v300"))],
         "no tokenizer"),
    # ------------------------------------------------------------------ CLI arguments
    Case("run-seeds-zero", "moe run --seeds 0",
         lambda fx: ["run", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'study'}",
                     "--seeds", "0"], "--seeds"),
    Case("run-unknown-stage", "moe run --stage nonsense",
         lambda fx: ["run", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'study'}",
                     "--stage", "nonsense"], "nonsense"),
    Case("study-eval-data-missing", "study.eval_data naming a file that does not exist",
         lambda fx: _study(fx, f"study.eval_data=[poems={fx['tmp']}/none.txt]"),
         "study.eval_data: poems="),
    Case("study-seed-fraction", "study.seed_fraction outside (0, 1)",
         lambda fx: _study(fx, "study.seed_fraction=1.2"), "study.seed_fraction must be in (0, 1)"),
    Case("study-fork-cosine", "fork protocol with a schedule that has no stable phase (cosine)",
         lambda fx: _study(fx, "optim.schedule=cosine"), "optim.schedule=wsd"),
    Case("study-fork-in-cooldown", "fork point inside the monolith's cool-down",
         lambda fx: _study(fx, "study.seed_fraction=0.85"), "cool-down"),
    Case("study-merge-typo", "study.merge_method misspelled (tiess): refused before any training",
         lambda fx: _study(fx, "study.merge_method=tiess"), "tiess"),
    Case("study-unknown-arm", "study.arms names an arm that does not exist",
         lambda fx: _study(fx, "study.arms=[seed,experts]"), "unknown value 'experts'"),
    Case("study-budget-too-small", "study budget leaves no step for the branches",
         lambda fx: _study(fx, "study.budget_steps=4"), "no step is left"),
    Case("study-fork-partition", "fork protocol with a partitioning split",
         lambda fx: _study(fx, "study.split_method=random"), "split_method=copy"),
    Case("sweep-unknown-key", "moe sweep over a key that does not exist",
         lambda fx: ["sweep", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'sweep'}",
                     "study.budget_stepz=60,120"], "study.budget_stepz"),
    Case("sweep-wrong-type", "moe sweep value of the wrong type",
         lambda fx: ["sweep", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'sweep'}",
                     "study.budget_steps=60,many"], "budget_steps=many"),
    Case("sweep-one-value", "moe sweep with a single value",
         lambda fx: ["sweep", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'sweep'}",
                     "study.budget_steps=60,60"], "listed twice"),
    Case("sweep-seeds-zero", "moe sweep --seeds 0",
         lambda fx: ["sweep", str(DEBUG / "study.yaml"), f"out_dir={fx['tmp'] / 'sweep'}",
                     "study.budget_steps=60,120", "--seeds", "0"], "--seeds"),
    Case("cli-int-arg", "eval --max-docs given a word",
         lambda fx: ["eval", str(fx["dense"]), "--max-docs", "lots"], "--max-docs"),
    Case("cli-unknown-command", "unknown subcommand",
         lambda fx: ["frobnicate"], "frobnicate"),
    Case("prune-fraction", "moe prune --heads 1.0 (fractions are in [0, 1))",
         lambda fx: ["prune", str(fx["dense"]), "--heads", "1.0", "--out",
                     str(fx["tmp"] / "pruned")], "a fraction in [0, 1) is needed"),
    Case("prune-every-head", "moe prune removing every head of each layer, no --allow-empty",
         lambda fx: ["prune", str(fx["dense"]), "--heads", "0.9", "--method", "random", "--out",
                     str(fx["tmp"] / "pruned")], "--allow-empty"),
    Case("prune-other-scores", "moe prune --scores computed for another checkpoint",
         lambda fx: ["prune", str(fx["moe"]), "--ffn", "0.5", "--scores",
                     str(_scores_fx(fx)), "--out", str(fx["tmp"] / "pruned")],
         "computed for another checkpoint"),
    Case("importance-unknown-domain", "moe importance --domains naming no domain",
         lambda fx: ["importance", str(fx["dense"]), "--domains", "klingon", "--out",
                     str(fx["tmp"] / "scores.safetensors")], "unknown domain 'klingon'"),
    Case("grow-smaller", "moe grow to a smaller FFN",
         lambda fx: ["grow", str(fx["dense"]), "--ffn-dim", "8", "--out", str(fx["tmp"] / "g")],
         "use moe shrink to make a model smaller"),
    Case("shrink-layer-range", "moe shrink --drop-layers naming a layer the model lacks",
         lambda fx: ["shrink", str(fx["dense"]), "--drop-layers", "7", "--out",
                     str(fx["tmp"] / "s")], "layer 7 out of range"),
    Case("shrink-every-layer", "moe shrink removing every layer",
         lambda fx: ["shrink", str(fx["dense"]), "--drop-layers", "0,1", "--out",
                     str(fx["tmp"] / "s")], "leaves no layer"),
    Case("delta-other-base", "moe delta apply onto a checkpoint other than the delta's base",
         lambda fx: ["delta", "apply", str(fx["moe"]), str(_delta_fx(fx)), "-o",
                     str(fx["tmp"] / "applied")], "apply a delta to its own base"),
    Case("delta-density", "moe delta compress topk:1.5 (densities are in (0, 1])",
         lambda fx: ["delta", "compress", str(_delta_fx(fx)), "topk:1.5", "-o",
                     str(fx["tmp"] / "c.delta.safetensors")], "must be in (0, 1]"),
    Case("delta-rank", "moe delta compress lowrank:R with R larger than a tensor allows",
         lambda fx: ["delta", "compress", str(_delta_fx(fx)), "lowrank:999", "-o",
                     str(fx["tmp"] / "c.delta.safetensors")], "rank 999 is larger"),
    Case("sweep-an-experiment", "moe sweep of an experiment recipe (not a study)",
         lambda fx: ["sweep", str(REPO / "recipes" / "fleet" / "fleet.yaml"),
                     f"out_dir={fx['tmp'] / 'sweep-fleet'}", "fleet.steps=128,256"],
         "is a fleet experiment"),
    Case("fleet-no-replicas", "a fleet of R = 0 replicas",
         lambda fx: ["run", str(REPO / "recipes" / "fleet" / "fleet.yaml"),
                     f"out_dir={fx['tmp'] / 'fleet'}", "fleet.replicas=0"],
         "fleet.replicas must be >= 1"),
    # ------------------------------------------------------------------ config.json vs weights
    Case("eval-config-disagrees", "eval: config.json says dim 32, the weights are 64 wide",
         lambda fx: ["eval", str(fx["cfgdim"])], "dim is 32 but the weights are 64 wide",
         subprocess=True),
    Case("generate-config-disagrees", "generate: config.json disagrees with the weights (dim)",
         lambda fx: ["generate", str(fx["cfgdim"])], "dim is 32 but the weights are 64 wide"),
    Case("split-config-disagrees", "split: config.json disagrees with the weights (dim)",
         lambda fx: ["split", str(fx["cfgdim"]), "--experts", "text,code",
                     "--out", str(fx["tmp"] / "s")], "dim is 32 but the weights are 64 wide"),
    Case("prune-config-disagrees", "prune: config.json disagrees with the weights (dim)",
         lambda fx: ["prune", str(fx["cfgdim"]), "--ffn", "0.5", "--method", "magnitude",
                     "--out", str(fx["tmp"] / "pruned")], "dim is 32 but the weights are 64 wide"),
    Case("export-config-disagrees", "export: config.json disagrees with the weights (dim)",
         lambda fx: ["export", str(fx["cfgdim"]), "--out", str(fx["tmp"] / "e")],
         "dim is 32 but the weights are 64 wide"),
    Case("grow-config-disagrees", "grow: config.json disagrees with the weights (dim)",
         lambda fx: ["grow", str(fx["cfgdim"]), "--ffn-dim", "256", "--out", str(fx["tmp"] / "g")],
         "dim is 32 but the weights are 64 wide"),
    Case("merge-config-disagrees", "merge: an input whose config.json disagrees with its weights",
         lambda fx: _merge_yaml(fx, "cfg_disagrees"), "dim is 32 but the weights are 64 wide"),
    Case("init-config-disagrees", "train init= a checkpoint whose config.json has more layers",
         lambda fx: _train(fx, f"init={fx['cfglayers']}"), "n_layers is 3 but the weights have 2"),
    Case("eval-config-tied", "eval: config.json says tie_embeddings, the weights have lm_head",
         lambda fx: ["eval", str(fx["cfgtied"])], "tie_embeddings is true"),
    # ------------------------------------------------------------------ sizes and memory
    Case("train-too-large", "train a model whose weights alone exceed the machine's memory",
         lambda fx: _train(fx, "model.dim=65536", "model.n_layers=1000", "model.n_heads=64",
                           "model.n_kv_heads=64", "model.ffn_dim=65536"), "need at least",
         subprocess=True),
    Case("run-dry-run-too-large", "moe run --dry-run of a study whose model cannot fit",
         lambda fx: [*_study(fx, "model.dim=65536", "model.n_layers=1000", "model.n_heads=64",
                             "model.n_kv_heads=64"), "--dry-run"], "need at least"),
    Case("grow-too-large", "moe grow to an FFN whose weights exceed the machine's memory",
         lambda fx: ["grow", str(fx["dense"]), "--ffn-dim", "1000000000",
                     "--out", str(fx["tmp"] / "g")], "need at least"),
    Case("init-select-no-layers", "moe init --method select to 0 layers",
         lambda fx: ["init", "--from", str(fx["dense"]), "--method", "select", "model.n_layers=0",
                     "--out", str(fx["tmp"] / "init-out")], "model.n_layers must be at least 1"),
    Case("init-select-no-dim", "moe init --method select to model dim 0",
         lambda fx: ["init", "--from", str(fx["dense"]), "--method", "select", "model.dim=0",
                     "--out", str(fx["tmp"] / "init-out")], "model.dim must be at least 1"),
    Case("train-no-ffn", "a recipe with model.ffn_dim=0",
         lambda fx: _train(fx, "model.ffn_dim=0"), "model.ffn_dim must be at least 1"),
    # ------------------------------------------------------------------ options and overrides
    Case("gen-device-unknown", "generate --device naming no device (tpu9)",
         lambda fx: ["generate", str(fx["dense"]), "--device", "tpu9"], "not a device name",
         subprocess=True),
    Case("gen-device-meta", "generate --device meta (a device that holds no data)",
         lambda fx: ["generate", str(fx["dense"]), "--device", "meta"], "--device meta"),
    Case("prune-heal-lr-negative", "moe prune --heal-lr -1",
         lambda fx: ["prune", str(fx["dense"]), "--ffn", "0.25", "--method", "magnitude",
                     "--heal-steps", "1", "--heal-lr=-1", "--out", str(fx["tmp"] / "pruned")],
         "--heal-lr must be a positive number"),
    Case("prune-heal-lr-zero", "moe prune --heal-lr 0",
         lambda fx: ["prune", str(fx["dense"]), "--ffn", "0.25", "--method", "magnitude",
                     "--heal-steps", "1", "--heal-lr", "0", "--out", str(fx["tmp"] / "pruned")],
         "--heal-lr must be a positive number"),
    Case("prune-heal-lr-nan", "moe prune --heal-lr nan",
         lambda fx: ["prune", str(fx["dense"]), "--ffn", "0.25", "--heal-steps", "1",
                     "--heal-lr", "nan", "--out", str(fx["tmp"] / "pruned")], "--heal-lr"),
    Case("override-yaml-list", "override whose value is broken YAML (`optim.lr=[0.1`)",
         lambda fx: _train(fx, "optim.lr=[0.1"), "not valid YAML", subprocess=True),
    Case("override-yaml-mapping", "override whose value is broken YAML (`data.weights={text: 1`)",
         lambda fx: _train(fx, "data.weights={text: 1"), "not valid YAML"),
    Case("merge-weight-overflow", "merge config: a weight beyond float32's range (1e39)",
         lambda fx: _merge_yaml(fx, "weight_1e39"), "beyond float32's range"),
    Case("delta-scale-nan", "moe delta apply --scale nan",
         lambda fx: ["delta", "apply", str(fx["dense"]), str(_delta_fx(fx)), "--scale", "nan",
                     "-o", str(fx["tmp"] / "applied")], "finite number"),
    Case("delta-scale-inf", "moe delta apply --scale inf",
         lambda fx: ["delta", "apply", str(fx["dense"]), str(_delta_fx(fx)), "--scale", "inf",
                     "-o", str(fx["tmp"] / "applied")], "finite number"),
    Case("run-dry-run-unknown-stage", "moe run --dry-run --stage nonsense (the run refuses it)",
         lambda fx: [*_study(fx), "--stage", "nonsense", "--dry-run"], "nonsense"),
    Case("data-not-recipe", "moe data FILE where FILE is a text file, not a recipe",
         lambda fx: ["data", str(fx["data"] / "numbers.txt")], "not a recipe file"),
    Case("eval-data-directory", "eval --data DOMAIN=DIR (a directory, not files)",
         lambda fx: ["eval", str(fx["dense"]), "--data", f"text={fx['data'] / 'corpus-dir'}"],
         "is a directory"),
    Case("corpus-directory", "files source path is a directory",
         lambda fx: _files(fx, "text", fx["data"] / "corpus-dir"), "is a directory"),
    # ------------------------------------------------------------------ every command
    Case("retokenize-unknown-init", "retokenize --init: unknown method",
         lambda fx: ["retokenize", str(fx["dense"]), "--out", str(fx["tmp"] / "r"), "--init",
                     "zeros", "--vocab-size", "300"], "choose one of mean, random"),
    Case("retokenize-no-target", "retokenize with neither --vocab-size nor --tokenizer",
         lambda fx: ["retokenize", str(fx["dense"]), "--out", str(fx["tmp"] / "r")],
         "give one of --vocab-size N"),
    Case("retokenize-missing-tokenizer", "retokenize --tokenizer: no such file",
         lambda fx: ["retokenize", str(fx["dense"]), "--out", str(fx["tmp"] / "r"),
                     "--tokenizer", str(fx["tmp"] / "nope.json")], "unknown tokenizer"),
    Case("retokenize-vocab-too-small", "retokenize --vocab-size below the 256 bytes",
         lambda fx: ["retokenize", str(fx["dense"]), "--out", str(fx["tmp"] / "r"),
                     "--vocab-size", "100"], "at least 258 tokens"),
    Case("delta-extract-other-base", "delta extract: the fine-tune descends from another seed",
         lambda fx: ["delta", "extract", str(fx["dense"]), str(fx["branch_other"]), "-o",
                     str(fx["tmp"] / "d.delta.safetensors")], "lineage differs"),
    Case("delta-extract-other-shape", "delta extract: base and fine-tune of other sizes",
         lambda fx: ["delta", "extract", str(fx["dense"]), str(fx["branch_small"]), "-o",
                     str(fx["tmp"] / "d.delta.safetensors")], "architecture differs"),
    Case("delta-extract-not-checkpoint", "delta extract: the base is not a checkpoint",
         lambda fx: ["delta", "extract", str(fx["notckpt"]), str(fx["dense"]), "-o",
                     str(fx["tmp"] / "d.delta.safetensors")], "incomplete checkpoint"),
    Case("delta-info-weights", "delta info on a model's weights, not a delta",
         lambda fx: ["delta", "info", str(fx["dense"] / "model" / "model.safetensors")],
         "not a moe-forge delta file"),
    Case("delta-info-missing", "delta info: no such file",
         lambda fx: ["delta", "info", str(fx["tmp"] / "nope.delta.safetensors")],
         "no such delta file"),
    Case("delta-compress-weights", "delta compress on a model's weights, not a delta",
         lambda fx: ["delta", "compress", str(fx["dense"] / "model" / "model.safetensors"),
                     "topk:0.1", "-o", str(fx["tmp"] / "c.delta.safetensors")],
         "not a moe-forge delta file"),
    Case("importance-too-many-batches", "importance --batches beyond the training split",
         lambda fx: ["importance", str(fx["dense"]), "--domains", "text", "--out",
                     str(fx["tmp"] / "s.safetensors"), "--batches", "100000"],
         "more than text's training split holds"),
    Case("shrink-unknown-select", "shrink --select: unknown method",
         lambda fx: ["shrink", str(fx["dense"]), "--out", str(fx["tmp"] / "s"), "--select",
                     "magic", "--ffn", "0.5"], "choose one of random, magnitude"),
    Case("grow-unknown-method", "grow --method: unknown method",
         lambda fx: ["grow", str(fx["dense"]), "--out", str(fx["tmp"] / "g"), "--method",
                     "clone", "--ffn-dim", "256"], "unknown method 'clone'"),
    Case("data-model-config", "moe data on a checkpoint's config.json",
         lambda fx: ["data", str(fx["dense"] / "model" / "config.json")], "unknown key"),
    Case("eval-context-too-long", "eval --context beyond the model's context",
         lambda fx: ["eval", str(fx["dense"]), "--context", "4096"],
         "--context 4096: must be between 1 and the model's context (256 tokens)"),
    Case("eval-stride-is-context", "eval --stride as long as the context",
         lambda fx: ["eval", str(fx["dense"]), "--context", "64", "--stride", "64"],
         "--stride 64: must be between 1 and the context minus one (63)"),
    Case("eval-stride-zero", "eval --stride 0",
         lambda fx: ["eval", str(fx["dense"]), "--stride", "0"], "--stride"),
    Case("eval-max-docs-zero", "eval --max-docs 0",
         lambda fx: ["eval", str(fx["dense"]), "--max-docs", "0"], "--max-docs"),
    Case("eval-max-batches-gone", "eval --max-batches (replaced by --max-docs)",
         lambda fx: ["eval", str(fx["dense"]), "--max-batches", "4"],
         "--max-batches was replaced by --max-docs"),
    Case("eval-tasks-unknown", "eval --tasks naming no lm-eval task (or lm-eval not installed)",
         lambda fx: ["eval", str(fx["dense"]), "--tasks", "no_such_task",
                     "--include-path", str(REPO / "tests" / "data" / "lm_eval_tasks")],
         "lm-eval"),
    Case("eval-tasks-stride", "eval --tasks with --stride (held-out evaluation only)",
         lambda fx: ["eval", str(fx["dense"]), "--tasks", "moe_phrases", "--stride", "8"],
         "--stride belongs to moe eval's own held-out evaluation"),
    Case("eval-limit-without-tasks", "eval --limit without --tasks",
         lambda fx: ["eval", str(fx["dense"]), "--limit", "3"], "--limit belongs to --tasks"),
    Case("study-eval-context-zero", "study.eval_context 0",
         lambda fx: _study(fx, "study.eval_context=0"), "study.eval_context 0"),
    # ------------------------------------------------------- mergekit parameters, experts, loggers
    Case("merge-gamma-out-of-range", "merge config: breadcrumbs with gamma 2 (a fraction)",
         lambda fx: _merge_yaml(fx, "gamma_two"), "gamma"),
    Case("merge-parameter-of-another-method", "merge config: ties given sce's select_topk",
         lambda fx: _merge_yaml(fx, "select_topk_on_ties"), "select_topk"),
    Case("experts-drop-every-expert", "moe experts --drop naming every expert",
         lambda fx: ["experts", str(fx["moe"]), "--drop", "text,code,dna",
                     "--out", str(fx["tmp"] / "x")], "no expert"),
    Case("experts-unknown-expert", "eval --experts naming an expert the model lacks",
         lambda fx: ["eval", str(fx["moe"]), "--experts", "text,rna"], "rna"),
    Case("train-unknown-logger", "recipe: trainer.logger naming no logger",
         lambda fx: _train(fx, "trainer.logger=neptune"), "neptune"),
]


def _delta_fx(fx) -> Path:
    """The delta of the text branch fixture over the dense fixture (moe delta extract)."""
    from moe.cli import main

    out = fx["tmp"] / "delta-fx" / "text.delta.safetensors"
    if not out.is_file():
        with contextlib.redirect_stdout(io.StringIO()):  # the catalogue prints to stdout
            assert main(["delta", "extract", str(fx["dense"]), str(fx["branch_text"]), "-o",
                         str(out)]) == 0
    return out


def _scores_fx(fx) -> Path:
    """Importance scores of the dense fixture (moe importance, one batch per domain)."""
    from moe.cli import main

    out = fx["tmp"] / "scores-fx" / "dense.safetensors"
    if not out.is_file():
        with contextlib.redirect_stdout(io.StringIO()):  # the catalogue prints to stdout
            assert main(["importance", str(fx["dense"]), "--domains", "text", "--batches", "1",
                         "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- fixtures


class Touch:
    """Unpickling this creates `marker` (what a hostile resume file could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _save_variant(src: Path, dst: Path, **meta_changes) -> Path:
    """A copy of checkpoint `src` with some meta.json fields changed (weights untouched)."""
    from moe.io.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src)
    meta = {**ck.meta, **meta_changes}
    meta.pop("sha256", None)
    return save_checkpoint(dst, ck.state_dict, ck.config, meta)


def build_fixtures(root: Path) -> dict[str, Path]:
    """Every input the catalogue needs, under `root` (a trained debug model: a few seconds)."""
    import dataclasses

    import torch

    from moe.cli import main
    from moe.io.checkpoint import load_checkpoint, make_meta, read_meta, save_checkpoint
    from moe.model.transformer import Transformer

    root = Path(root)
    fx: dict[str, Path] = {"tmp": root / "scratch"}
    fx["tmp"].mkdir(parents=True, exist_ok=True)
    run = root / "dense"
    assert main(["train", str(DEBUG / "dense.yaml"), f"out_dir={run}", "trainer.max_steps=2",
                 "trainer.checkpoint_every_n_steps=1", QUIET]) == 0
    fx["dense"] = run
    dense = run / "model"
    ck = load_checkpoint(dense)
    base_id = read_meta(dense)["id"]

    fx["moe"] = root / "moe"
    assert main(["split", str(dense), "--experts", "text,code,dna", "--out", str(fx["moe"])]) == 0
    fx["moe_domain"] = root / "moe-domain"
    assert main(["split", str(dense), "--experts", "text,code,dna", "--router", "domain",
                 "--out", str(fx["moe_domain"])]) == 0
    for dom in ("text", "code"):
        fx[f"branch_{dom}"] = _save_variant(dense, root / f"branch-{dom}", domain=dom, family=dom,
                                            kind="branch", parents=[base_id], base_id=base_id)
    fx["branch_other"] = _save_variant(dense, root / "branch-other", domain="code", family="code",
                                       kind="branch", base_id="another-seed")
    small_cfg = dataclasses.replace(ck.config, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=96)
    small = Transformer(small_cfg)
    fx["branch_small"] = save_checkpoint(
        root / "branch-small", small.state_dict(), small.config,
        make_meta(kind="branch", domain="code", family="code", parents=[base_id],
                  base_id=base_id))

    def broken(name: str) -> Path:
        dst = root / name
        shutil.copytree(dense, dst)
        return dst

    fx["trunc"] = broken("truncated")
    w = fx["trunc"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    fx["badmeta"] = broken("bad-meta")
    (fx["badmeta"] / "meta.json").write_text('{"id": "x", "sha256": {')
    fx["badcfg"] = broken("bad-config")
    cfg = json.loads((fx["badcfg"] / "config.json").read_text())
    cfg["num_layerz"] = 3
    (fx["badcfg"] / "config.json").write_text(json.dumps(cfg))
    # config.json that disagrees with the weights (each names the field)
    for name, change in (("cfgdim", {"dim": 32}), ("cfglayers", {"n_layers": 3}),
                         ("cfgtied", {"tie_embeddings": True})):
        fx[name] = broken(f"config-{name}")
        cfg = json.loads((fx[name] / "config.json").read_text())
        cfg.update(change)
        (fx[name] / "config.json").write_text(json.dumps(cfg))
    fx["notckpt"] = root / "not-a-checkpoint"
    fx["notckpt"].mkdir()
    (fx["notckpt"] / "notes.txt").write_text("hello\n")
    fx["trunc_ckpt"] = root / "truncated.ckpt"
    last = (run / "resume" / "last.ckpt").read_bytes()
    fx["trunc_ckpt"].write_bytes(last[: len(last) // 3])

    fx["evil_ckpt"] = root / "evil.ckpt"
    torch.save({"global_step": 1, "x": Touch(root / "pwned")}, fx["evil_ckpt"])

    # Hugging Face directories
    fx["hf_dense"] = root / "hf-dense"
    assert main(["export", str(dense), "--out", str(fx["hf_dense"])]) == 0
    fx["hf_noconfig"] = root / "hf-noconfig"
    fx["hf_noconfig"].mkdir()
    shutil.copy(fx["hf_dense"] / "model.safetensors", fx["hf_noconfig"] / "model.safetensors")
    fx["hf_gpt2"] = root / "hf-gpt2"
    shutil.copytree(fx["hf_dense"], fx["hf_gpt2"])
    hcfg = json.loads((fx["hf_gpt2"] / "config.json").read_text())
    hcfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (fx["hf_gpt2"] / "config.json").write_text(json.dumps(hcfg))

    # recipes
    rec = fx["recipes"] = root / "recipes"
    rec.mkdir()
    (rec / "bad.yaml").write_text("model:\n  size: debug\n data: [unclosed\n")
    (rec / "list.yaml").write_text("- model\n- data\n")
    (rec / "cycle_a.yaml").write_text("defaults: [cycle_b.yaml]\nname: a\n")
    (rec / "cycle_b.yaml").write_text("defaults: [cycle_a.yaml]\nname: b\n")
    (rec / "section_list.yaml").write_text(f"defaults: [{DEBUG / 'dense.yaml'}]\nmodel: [1, 2]\n")
    (rec / "lr_nan.yaml").write_text(f"defaults: [{DEBUG / 'dense.yaml'}]\noptim:\n  lr: .nan\n")
    (rec / "latin1.yaml").write_bytes(f"defaults: [{DEBUG / 'dense.yaml'}]\n".encode()
                                      + "name: caf\xe9\n".encode("latin-1"))

    # data files
    dat = fx["data"] = root / "data"
    dat.mkdir()
    (dat / "empty.txt").write_bytes(b"")
    (dat / "corpus.docx").write_bytes(b"PK\x03\x04 not really a document")
    g = torch.Generator().manual_seed(0)
    words = ["caf\xe9", "na\xefve", "\xe0 la", "r\xe9sum\xe9", "sol", "mar", "vent", "terre"]
    paras = []
    for _ in range(400):
        idx = torch.randint(len(words), (40,), generator=g).tolist()
        paras.append(" ".join(words[i] for i in idx) + ".\n\n")
    (dat / "latin1.txt").write_bytes("".join(paras).encode("latin-1"))
    bases = b"ACGTNRYKMSWBDHV"
    recs = []
    for r in range(4):
        idx = torch.randint(len(bases), (30000,), generator=g).tolist()
        seq = bytes(bases[i] for i in idx)
        lines = b"\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
        recs.append(b">chr%d synthetic\n" % r + lines + b"\n")
    (dat / "iupac.fa").write_bytes(b"".join(recs))
    (dat / "noheader.fa").write_bytes(b"ACGTACGTACGT\nACGTACGT\n")
    (dat / "garbage.fa").write_bytes(bytes(torch.randint(256, (4096,), generator=g).tolist()))
    plays = (REPO / "moe" / "data" / "samples" / "text" / "tinyshakespeare.txt").read_bytes()
    plays = plays[:120_000]  # real text, as much as the debug recipes use per domain
    (dat / "plays.txt.gz").write_bytes(gzip.compress(plays))
    (dat / "plays.txt.bz2").write_bytes(bz2.compress(plays))
    (dat / "plain.txt.gz").write_bytes(plays)
    (dat / "cut.txt.gz").write_bytes(gzip.compress(plays)[:20_000])
    rows = [json.dumps({"text": b.decode()}) for b in plays.split(b"\n\n")]
    (dat / "rows.jsonl.gz").write_bytes(gzip.compress("\n".join(rows).encode()))
    (dat / "noise.txt").write_bytes(bytes(torch.randint(256, (8192,), generator=g).tolist()))
    # a large file that YAML reads as one string (not a recipe), and a directory of text files
    (dat / "numbers.txt").write_text("\n".join(str(i) for i in range(50_000)) + "\n")
    (dat / "corpus-dir").mkdir()
    (dat / "corpus-dir" / "plays.txt").write_bytes(plays)

    # merge configs
    m = fx["merge"] = root / "merge"
    m.mkdir()
    bt, bc, bs = fx["branch_text"], fx["branch_code"], fx["branch_small"]

    def yaml(name: str, text: str) -> None:
        (m / f"{name}.yaml").write_text(text)

    two_code = f"  - model: {bc}\n  - model: {bc}\n"
    yaml("ok", f"merge_method: linear\nmodels:\n{two_code}")
    yaml("slerp_no_t", f"merge_method: slerp\nmodels:\n{two_code}")
    base = fx["dense"] / "model"
    yaml("gamma_two", f"merge_method: breadcrumbs\nbase_model: {base}\n"
                      f"parameters: {{density: 0.5, gamma: 2}}\nmodels:\n{two_code}")
    yaml("select_topk_on_ties", f"merge_method: ties\nbase_model: {base}\nparameters: "
                                f"{{density: 0.5, select_topk: 0.5}}\nmodels:\n{two_code}")
    yaml("list", "- linear\n- ties\n")
    yaml("parameters_list", f"merge_method: linear\nparameters: [1, 2]\nmodels:\n{two_code}")
    yaml("models_mapping", f"merge_method: linear\nmodels: {{a: {bc}}}\n")
    yaml("weight_nan", f"merge_method: linear\nmodels:\n  - model: {bc}\n"
                       f"    parameters: {{weight: .nan}}\n  - model: {bc}\n")
    yaml("lambda_inf", f"merge_method: linear\nparameters: {{lambda: .inf}}\nmodels:\n{two_code}")
    yaml("t_nan", f"merge_method: slerp\nparameters: {{t: .nan}}\nmodels:\n{two_code}")
    yaml("unknown_key", f"merge_mthod: linear\nmodels:\n{two_code}")
    yaml("weight_1e39", f"merge_method: linear\nmodels:\n  - model: {bc}\n"
                        f"    parameters: {{weight: 1.0e39}}\n  - model: {bc}\n")
    yaml("cfg_disagrees", f"merge_method: linear\nmodels:\n  - model: {bc}\n"
                          f"  - model: {fx['cfgdim']}\n")
    yaml("unknown_method", f"merge_method: frankenmerge\nmodels:\n{two_code}")
    yaml("slerp3", f"merge_method: slerp\nparameters: {{t: 0.5}}\nmodels:\n{two_code}"
                   f"  - model: {bc}\n")
    yaml("density0", f"merge_method: ties\nbase_model: {dense}\nparameters: {{density: 0}}\n"
                     f"models:\n{two_code}")
    yaml("density2", f"merge_method: ties\nbase_model: {dense}\nmodels:\n"
                     f"  - model: {bc}\n    parameters: {{density: 2}}\n  - model: {bc}\n")
    yaml("missing_model", f"merge_method: linear\nmodels:\n  - model: {bc}\n"
                          f"  - model: {root / 'no-such-model'}\n")
    yaml("shapes", f"merge_method: linear\nmodels:\n  - model: {bc}\n  - model: {bs}\n")
    yaml("cross_family", f"merge_method: task_arithmetic\nbase_model: {dense}\nmodels:\n"
                         f"  - model: {bt}\n  - model: {bc}\n")
    yaml("truncated", f"merge_method: linear\nmodels:\n  - model: {bc}\n"
                      f"  - model: {fx['trunc']}\n")
    (m / "latin1.yaml").write_bytes(b"merge_method: linear\n# caf\xe9\nmodels:\n"
                                    + two_code.encode())
    return fx


def run_case(case: Case, fx: dict[str, Path], in_process: bool = True) -> tuple[int, str]:
    """Run one case: (exit code, stderr). scratch/ is emptied first so cases never see each
    other's outputs."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    shutil.rmtree(fx["tmp"], ignore_errors=True)
    fx["tmp"].mkdir(parents=True)
    argv = [str(a) for a in case.argv(fx)]
    if not in_process:
        p = subprocess.run([sys.executable, "-m", "moe.cli", *argv], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        return p.returncode, p.stderr
    from moe.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
    return rc, err.getvalue()


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (except scratch/) and its bytes: to prove nothing was overwritten."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and "scratch" not in p.relative_to(root).parts and p.name != ".lock":
            out[str(p.relative_to(root))] = p.read_bytes()
    return out
