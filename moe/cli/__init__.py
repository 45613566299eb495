"""The `moe` command: maps each subcommand to a plain library function. No logic of its own.

A user mistake (ConfigError and its subclasses) prints one line `moe: error: ...` and exits 2,
with no traceback. Set MOE_DEBUG=1 to see tracebacks. SIGTERM and SIGINT print one line
`moe: interrupted by SIGTERM ...` and exit 143 (SIGINT: 130); training stops at the end of the
step in progress, writes its resume file there, and the line says how to resume
(moe/train/signals.py).

Every list of names in the help and in argparse's choices (split, init and merge methods, delta
compression steps, experiments) is read from its registry, when it is first shown or checked:
`moe --help` imports none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from moe.cli.commands import (  # noqa: F401 (re-exported)
    cmd_assemble,
    cmd_data,
    cmd_delta,
    cmd_eval,
    cmd_experts,
    cmd_export,
    cmd_generate,
    cmd_grow,
    cmd_import,
    cmd_importance,
    cmd_init,
    cmd_merge,
    cmd_prune,
    cmd_retokenize,
    cmd_run,
    cmd_shrink,
    cmd_split,
    cmd_sweep,
    cmd_train,
)
from moe.cli.types import (  # noqa: F401 (re-exported: the option types)
    COUNT0,
    COUNT1,
    FLOAT,
    INT32_MAX,
    SEED,
    _one_line,
    finite_float,
    int_in,
)
from moe.config import ASSEMBLE_SHARED, ROUTER_INITS, ROUTERS, ConfigError


class _Parser(argparse.ArgumentParser):
    """Argument mistakes print one line `moe: error: ...` and exit 2, like every other mistake.
    A description may be a function: it is called when the help is first shown."""

    def error(self, message: str):
        cmd = self.prog.removeprefix("moe").strip()
        self.exit(2, f"moe: error: {cmd + ': ' if cmd else ''}{message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


class Names(Sequence[str]):
    """A registry's names, read the first time argparse needs them (to show the help or check a
    value), so building the parser imports no registry. As `choices=` it is what argparse checks;
    `str()` joins the names for a help text."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load, self._names = load, None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(self._load())
        return self._names

    def __getitem__(self, i):  # type: ignore[override]
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __str__(self) -> str:
        return ", ".join(self._get())


def _listing(action: argparse.Action, **lists: Names) -> argparse.Action:
    """`%(NAME)s` in the action's help text shows lists[NAME] (argparse expands the action's
    attributes in its help)."""
    for key, names in lists.items():
        setattr(action, key, names)
    return action


def _split_methods() -> list[str]:
    from moe.model.split import SPLITS

    return SPLITS.names()


def _prune_methods() -> tuple[str, ...]:
    from moe.surgery.prune import METHODS

    return METHODS


def _grow_methods() -> tuple[str, ...]:
    from moe.surgery.structure import GROW_METHODS

    return GROW_METHODS


def _init_methods() -> list[str]:
    from moe.model.init_dist import METHODS

    return METHODS.names()


def _merge_methods() -> list[str]:
    from moe.merge.registry import METHODS

    return METHODS.names()


def _compression_steps(kind: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from moe.delta.registry import usage

        return usage(kind)

    return load


def _run_description() -> str:
    from moe.experiments import EXPERIMENTS

    listed = "; ".join(f"{name}: {e.description}" for name, e in EXPERIMENTS.items())
    return ("Run a recipe: the specialization study (its arms: moe run --list-arms), or the "
            f"experiment a section of the recipe switches on ({listed}).")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moe",
        description="moe-forge: domain experts from dense LMs: split, train, merge, measure.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_cmd(name: str, help: str, func, optional: bool = False, description=None):
        sp = sub.add_parser(name, help=help, description=description or help)
        sp.add_argument("recipe", nargs="?" if optional else None, help="recipe YAML file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
        sp.set_defaults(func=func)
        return sp

    sp = recipe_cmd("train", "run one training stage from a recipe", cmd_train)
    sp.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    sp = recipe_cmd("run", "run a recipe: the specialization study, or the experiment a section "
                    "of it switches on (see moe run --help)", cmd_run, optional=True,
                    description=_run_description)
    sp.add_argument("--overwrite", action="store_true", help="start the study again from scratch")
    sp.add_argument("--stage", help="re-run or resume this one stage (e.g. branch-code, eval)")
    sp.add_argument("--seeds", type=COUNT1, default=None,
                    help="repeat with N seeds (default: study.seeds); mean ± 95%% CI")
    sp.add_argument("--jobs", type=int_in(-INT32_MAX, INT32_MAX), default=1, metavar="N",
                    help="run the seeds' studies (one seed: the training stages whose inputs "
                    "are built) in up to N processes at once (default 1); the same results")
    sp.add_argument("--dry-run", action="store_true", help="print the stage plan and budget only")
    sp.add_argument("--list-arms", action="store_true", help="list the study arms and exit")

    sp = recipe_cmd("sweep", "one study per value of a recipe key (key=v1,v2,... or `sweep:`)",
                    cmd_sweep)
    sp.add_argument("--overwrite", action="store_true",
                    help="replace a different sweep's directory")
    sp.add_argument("--seeds", type=COUNT1, default=None,
                    help="seeds per value (default: study.seeds)")
    sp.add_argument("--jobs", type=int_in(-INT32_MAX, INT32_MAX), default=1, metavar="N",
                    help="each value's seeds (or training stages) in up to N processes at once")
    sp.add_argument("--dry-run", action="store_true", help="print every value's stage plan only")

    sp = sub.add_parser("eval", help="per-domain held-out loss and bits per byte",
                        description="Per-domain held-out loss and bits per byte: every held-out "
                        "document whole, in disjoint windows of the model's context, its first "
                        "token after BOS (lm-eval-harness's rolling log-likelihood).")
    sp.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    sp.add_argument("--domains", help="comma-separated domains (default: text,code,dna, or "
                    "every domain of --data)")
    sp.add_argument("--data", action="append", metavar="SPEC",
                    help="evaluate on this data instead of the checkpoint's recipe: a recipe file "
                    "(its held-out split), DOMAIN=PATH_OR_GLOB or DOMAIN=hf:NAME[:SPLIT] (every "
                    "document held out); repeatable")
    sp.add_argument("--context", type=COUNT1, default=None, metavar="N",
                    help="tokens of context per window (default: the model's max_seq_len; "
                    "lower only)")
    sp.add_argument("--stride", type=COUNT1, default=None, metavar="S",
                    help="sliding windows advanced by S < context tokens, each scoring only its "
                    "new tokens (default: disjoint windows, as lm-eval-harness)")
    sp.add_argument("--max-docs", type=COUNT1, default=None, metavar="N",
                    help="score only the first N held-out documents of each domain, a sample "
                    "(default: every document, whole)")
    sp.add_argument("--max-batches", help=argparse.SUPPRESS)  # replaced by --max-docs
    sp.add_argument("--batch-size", type=COUNT1, default=8,
                    help="windows of --context tokens per forward pass (default 8)")
    sp.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer for a checkpoint imported without one (directory or "
                    "tokenizer.json); a checkpoint's own tokenizer is always used")
    sp.add_argument("--tasks", metavar="T1,T2",
                    help="run lm-evaluation-harness tasks (names or YAML files) on each "
                    "checkpoint instead (needs pip install 'moe-forge[lmeval]'); --domains names "
                    "the one expert a domain-routed MoE uses, --context its max length")
    sp.add_argument("--include-path", metavar="DIR",
                    help="with --tasks: a folder of your own lm-eval task YAMLs")
    sp.add_argument("--limit", type=COUNT1, default=None, metavar="N",
                    help="with --tasks: at most N documents per task (a sample)")
    sp.add_argument("--num-fewshot", type=COUNT0, default=None, metavar="K",
                    help="with --tasks: few-shot examples per request (default: the task's)")
    sp.add_argument("--device", default=None,
                    help="with --tasks: torch device (default: cuda when available, else cpu)")
    sp.add_argument("--experts", metavar="A,B",
                    help="an MoE with only these experts, in memory (the others dropped, their "
                    "router rows removed; nothing written to the checkpoint)")
    sp.add_argument("--expert-top-k", type=COUNT1, default=None, metavar="K",
                    help="experts per token of a learned router, in memory (1..experts)")
    sp.add_argument("--json", help="write results here (default: eval.json in each directory, "
                    "eval-data.json with --data, eval-experts.json with --experts or "
                    "--expert-top-k, lm-eval.json with --tasks)")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("split", help="split a dense checkpoint into domain experts")
    sp.add_argument("checkpoint", help="dense checkpoint or run directory")
    sp.add_argument("--experts", required=True, help="comma-separated expert names (domains)")
    sp.add_argument(
        # a metavar: without one argparse reads the choices as the option is added
        "--method", default="copy", choices=Names(_split_methods), metavar="METHOD",
        help="copy the FFN (upcycling) or partition its neurons: %(choices)s (default copy)",
    )
    sp.add_argument("--router", default="learned", choices=ROUTERS)
    sp.add_argument(
        "--top-k", type=COUNT1, default=None,
        help="experts per token, learned router (default: 2, or 1 with one expert)",
    )
    sp.add_argument(
        "--shared-dim", type=COUNT0, default=0,
        help="activation split: neurons every domain needs form a shared expert of this size",
    )
    sp.add_argument("--calib-batches", type=COUNT1, default=8,
                    help="activation split: batches/domain")
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_split)

    sp = sub.add_parser("init", help="a fresh model from a trained model's weight distribution")
    sp.add_argument("overrides", nargs="*", help="model.FIELD=VALUE: the target's shape (select)")
    sp.add_argument("--from", dest="source", required=True, help="trained checkpoint")
    _listing(sp.add_argument("--method", required=True, help="one of %(names)s "
                             "(see moe/model/init_dist.py)"), names=Names(_init_methods))
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--keep-norms", action="store_true", help="copy the trained norm gains")
    sp.add_argument("--keep-embeddings", action="store_true",
                    help="copy the trained token embedding and output head")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("importance", help="per-domain importance of every head, FFN neuron "
                        "and layer (safetensors + JSON summary)")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("--domains", required=True, help="comma-separated domains to score")
    sp.add_argument("--out", required=True, help="scores file (.safetensors; .json beside it)")
    sp.add_argument("--batches", type=COUNT1, default=8, help="calibration batches per domain "
                    "(training split)")
    sp.add_argument("--batch-size", type=COUNT1, default=8)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_importance)

    sp = sub.add_parser("prune", help="remove heads, FFN neurons and layers by importance; "
                        "optionally sparsify and quantize")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--heads", type=FLOAT, default=0.0,
                    help="fraction of key/value head groups removed per layer, in [0, 1)")
    sp.add_argument("--ffn", type=FLOAT, default=0.0,
                    help="fraction of FFN neurons removed per layer (per expert), in [0, 1)")
    sp.add_argument("--layers", type=COUNT0, default=0, help="number of whole layers removed")
    sp.add_argument("--by", default="all", help="DOMAIN whose scores decide, or all (default)")
    _listing(sp.add_argument("--method", default="taylor", help="%(names)s (default taylor)"),
             names=Names(_prune_methods))
    sp.add_argument("--scores", help="scores from moe importance (default: computed now)")
    sp.add_argument("--domains", help="domains to score when --scores is not given "
                    "(default: --by, or the checkpoint's domains for all)")
    sp.add_argument("--batches", type=COUNT1, default=8, help="calibration batches per domain")
    sp.add_argument("--heal-steps", type=COUNT0, default=0,
                    help="fine-tune the pruned model this many steps (--by's stream)")
    sp.add_argument("--heal-lr", type=FLOAT, default=1e-3)
    sp.add_argument("--unstructured", type=FLOAT, default=0.0,
                    help="then zero this fraction of each weight matrix by magnitude")
    sp.add_argument("--bits", type=COUNT1, default=16, help="simulated weight quantization: 16 "
                    "(none), 8 or 4")
    sp.add_argument("--group", type=COUNT1, default=32, help="quantization group size")
    sp.add_argument("--seed", type=SEED, default=0, help="seed of --method random and healing")
    sp.add_argument("--allow-empty", action="store_true",
                    help="allow removing every head (or neuron) of a layer")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("grow", help="a larger model computing the same function: more FFN "
                        "neurons, heads, model dim or layers")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--ffn-dim", type=COUNT1, help="FFN hidden size (each expert's for an MoE)")
    sp.add_argument("--dim", type=COUNT1, help="model dim (zero channels; norm gains rescaled)")
    sp.add_argument("--kv-heads", type=COUNT1, help="key/value head groups (query heads follow)")
    _listing(sp.add_argument("--method", default="zero", help="new units, one of %(names)s: "
                             "zero (zero output weights), split (Net2Net copies)"),
             names=Names(_grow_methods))
    sp.add_argument("--noise", type=FLOAT, default=0.0,
                    help="split: perturb the copies' output shares (still exact)")
    sp.add_argument("--identity-after", help="LLaMA-Pro: identity copies after these layers")
    sp.add_argument("--duplicate", help="SOLAR: repeat layers A..B-1 (A:B)")
    sp.add_argument("--layers", help="new layer i = old layer L[i], e.g. 0,1,1,2")
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_grow)

    sp = sub.add_parser("shrink", help="a smaller model: delete layers (by index or Block "
                        "Influence), FFN neurons, heads, channels; optionally heal")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("overrides", nargs="*", help="key=value for the healing stage (optim.lr=...)")
    sp.add_argument("--out", required=True,
                    help="output checkpoint (a run directory with --heal-steps)")
    sp.add_argument("--drop-layers", help="delete these layers, e.g. 3,5")
    sp.add_argument("--bi-layers", type=COUNT0, default=0,
                    help="delete the N layers of lowest Block Influence (ShortGPT)")
    sp.add_argument("--by", default="all", help="Block Influence calibration domain, or all")
    sp.add_argument("--calib-batches", type=COUNT1, default=8, help="per domain (train split)")
    sp.add_argument("--ffn", type=FLOAT, default=0.0, help="fraction of FFN neurons removed")
    sp.add_argument("--heads", type=FLOAT, default=0.0, help="fraction of kv head groups removed")
    sp.add_argument("--channels", type=FLOAT, default=0.0, help="fraction of model dim removed")
    sp.add_argument("--select", default="magnitude", help="random | magnitude")
    sp.add_argument("--heal-steps", type=COUNT0, default=0,
                    help="train the cut model N steps (resumable training stage)")
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_shrink)

    sp = sub.add_parser("retokenize", help="move a checkpoint to a new tokenizer, keeping "
                        "every middle layer (BPE trained on its corpora, or given)")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("overrides", nargs="*", help="key=value for the training stage (--steps)")
    sp.add_argument("--out", required=True,
                    help="output checkpoint (a run directory with --steps)")
    sp.add_argument("--vocab-size", type=COUNT1, help="train a byte-level BPE of this size")
    sp.add_argument("--tokenizer", help="or use this tokenizer (directory or tokenizer.json)")
    sp.add_argument("--init", default="mean", help="new embeddings: mean (of the old rows "
                    "of the bytes each token spells) | random")
    sp.add_argument("--steps", type=COUNT0, default=0, help="then train N steps (resumable stage)")
    sp.add_argument("--freeze-body", action="store_true",
                    help="train only the embeddings and the head")
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_retokenize)

    sp = sub.add_parser("assemble", help="assemble dense branches into one MoE (Branch-Train-Mix), "
                        "or the MoE a mergekit-moe CONFIG.yaml describes")
    sp.add_argument("branches", nargs="+", help="branch checkpoints or run directories, or one "
                    "mergekit-moe config (.yaml/.yml: base_model, gate_mode, experts, ...)")
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--experts", help="names in branch order (default: the branch domains)")
    sp.add_argument(
        "--shared", default="average", choices=ASSEMBLE_SHARED,
        help="non-FFN weights: average of the branches, or taken from --base",
    )
    sp.add_argument("--base", help="checkpoint whose non-FFN weights to use with --shared base")
    sp.add_argument("--router", default="learned", choices=ROUTERS)
    sp.add_argument(
        "--top-k", type=COUNT1, default=None,
        help="experts per token, learned router (default: 2, or 1 with one expert)",
    )
    sp.add_argument(
        "--router-init", default="random", choices=ROUTER_INITS,
        help="router rows random, or each domain's mean hidden state",
    )
    sp.add_argument("--seed", type=SEED, default=0)
    sp.add_argument("--hf-out", metavar="HF_DIR", help="mergekit-moe config with moe-forge "
                    "inputs: also write the Hugging Face export here")
    sp.add_argument("--max-shard-size", default=None, metavar="SIZE",
                    help="mergekit-moe config: shard Hugging Face weights above SIZE (default 5GB)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_assemble)

    sp = sub.add_parser("experts", help="an MoE with experts dropped, kept or added, or another "
                        "top-k, as a new checkpoint (FlexOlmo's opt-out; no training)")
    sp.add_argument("checkpoint", help="MoE checkpoint or run directory")
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--drop", metavar="A,B", help="remove these experts")
    group.add_argument("--keep", metavar="A,B", help="keep only these experts")
    sp.add_argument("--add", action="append", metavar="NAME=CKPT[:EXPERT]",
                    help="add expert NAME: expert EXPERT of MoE checkpoint CKPT, or the FFN of a "
                    "dense CKPT, of the same lineage and shapes; repeatable")
    sp.add_argument("--router-row", default="zero", choices=("zero", "domain_mean"),
                    help="an added expert's router row: zero, or domain NAME's mean hidden "
                    "state scaled to the other rows (default zero)")
    sp.add_argument("--calib-batches", type=COUNT1, default=4,
                    help="--router-row domain_mean: training batches of the domain")
    sp.add_argument("--top-k", type=COUNT1, default=None,
                    help="experts per token, learned router (default: the model's, clamped to "
                    "the experts left)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_experts)

    sp = sub.add_parser("merge", help="merge fine-tunes of one expert family (MERGE.yaml)")
    _listing(sp.add_argument("config", help="merge config YAML (models:, merge_method: one of "
                             "%(names)s, base_model: ...)"), names=Names(_merge_methods))
    sp.add_argument("--out", help="output directory (default: the config's out:)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_merge)

    sp = sub.add_parser("delta", help="fine-tune deltas: extract, compress, apply, info")
    dsub = sp.add_subparsers(dest="action", required=True)
    dp = dsub.add_parser("extract", help="the lossless delta FINETUNE - BASE (one file)")
    dp.add_argument("base", help="base checkpoint or run directory")
    dp.add_argument("finetune", help="fine-tuned checkpoint of that base")
    dp.add_argument("-o", "--out", required=True, help="output delta file (NAME.delta.safetensors)")
    dp.add_argument("--allow-cross-family", action="store_true",
                    help="extract even when the base belongs to another expert family")
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--json", action="store_true", help="print the delta's info as JSON")
    dp = dsub.add_parser("compress", help="re-encode a delta by a compression spec (e.g. "
                         "topk:0.05+int8)")
    dp.add_argument("delta", help="input delta file")
    _listing(dp.add_argument("method", help="compression spec STEP[+STEP]: a structure step "
                             "(%(structure)s), then a values step (%(values)s); e.g. "
                             "topk:0.05+int8, dare:0.1, lowrank:4; none: lossless"),
             structure=Names(_compression_steps("structure")),
             values=Names(_compression_steps("values")))
    dp.add_argument("-o", "--out", required=True, help="output delta file")
    dp.add_argument("--seed", type=SEED, default=0, help="seed of DARE's random mask")
    dp.add_argument("--overwrite", action="store_true")
    dp.add_argument("--json", action="store_true")
    dp = dsub.add_parser("apply", help="base + delta -> a checkpoint (the base's hash is checked)")
    dp.add_argument("base", help="the delta's own base checkpoint")
    dp.add_argument("delta", help="delta file")
    dp.add_argument("-o", "--out", required=True, help="output checkpoint directory")
    dp.add_argument("--scale", type=FLOAT, default=1.0, help="apply scale x delta")
    dp.add_argument("--overwrite", action="store_true")
    dp = dsub.add_parser("info", help="a delta's exact size in bytes, density, rank, lineage")
    dp.add_argument("delta", help="delta file")
    dp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_delta)

    sp = sub.add_parser("import", help="import a Hugging Face Llama/Mistral/Qwen2/Mixtral/"
                        "Qwen2-MoE model or a GGUF file")
    sp.add_argument(
        "hf_dir", help="directory with config.json and *.safetensors, a .gguf file or its directory"
    )
    sp.add_argument("--out", required=True, help="output checkpoint directory")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("export", help="export a checkpoint as Hugging Face Llama/Qwen2/Mixtral/"
                        "Qwen2-MoE")
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("--out", required=True, help="output Hugging Face directory")
    sp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="shard the weights above SIZE, e.g. 5GB, 500MB (default 5GB)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser(
        "generate", help="continue a prompt with a checkpoint; show which expert got each token",
        description="Continue a prompt with a checkpoint (greedy unless a sampling option is "
        "given), optionally showing the routing of every token.",
    )  # fmt: skip
    sp.add_argument("checkpoint", help="checkpoint or run directory")
    sp.add_argument("--prompt", help="prompt text (default: empty, start from BOS)")
    sp.add_argument("--prompt-file", help="read the prompt from this file (bytes as they are)")
    sp.add_argument("--max-new-tokens", type=COUNT0, default=64)
    sp.add_argument("--temperature", type=FLOAT, help="sampling temperature (> 0)")
    sp.add_argument("--top-k", type=COUNT1, help="sample among the k most likely tokens")
    sp.add_argument("--top-p", type=FLOAT, help="sample from the smallest set with mass >= p")
    sp.add_argument("--seed", type=SEED, help="sampling seed (sampling repeats with it)")
    sp.add_argument("--domain", help="domain (expert) for a domain-routed MoE")
    sp.add_argument("--experts", metavar="A,B",
                    help="an MoE with only these experts, in memory (nothing written)")
    sp.add_argument("--expert-top-k", type=COUNT1, default=None, metavar="K",
                    help="experts per token of a learned router, in memory (--top-k is the "
                    "sampling option)")
    sp.add_argument("--show-routing", action="store_true",
                    help="print the text coloured by the expert of each token, per layer")
    sp.add_argument("--layer", type=COUNT0, help="show this layer only")
    sp.add_argument("--html", help="write a self-contained HTML page of the routing")
    sp.add_argument("--json", help="write tokens, ids and per-layer expert ids and weights")
    sp.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    sp.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    sp.add_argument("--tokenizer", help="tokenizer dir/file, for a checkpoint imported without one")
    sp.set_defaults(func=cmd_generate)

    sp = recipe_cmd("data", "show what each domain corpus holds", cmd_data, optional=True)
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _resume_hint(args, e, argv: list[str] | None) -> str:
    """How to continue a training stage a signal stopped: `moe train` resumes its run with
    resume=RUN (or starts again when no step was saved); the commands that train inside (run,
    sweep, shrink --heal-steps, retokenize --steps) resume when run again, without --overwrite."""
    import shlex

    if e.run is None:
        return ""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--overwrite"]
    if args.command == "train":
        saved = (Path(e.run) / "resume" / "last.ckpt").is_file()
        keep = [w for w in words if not w.startswith(("resume=", "overwrite="))]
        words = keep + [f"resume={e.run}"] if saved else keep + ["--overwrite"]
        if not saved:
            return f"; no step was saved, start again with: moe {shlex.join(words)}"
    return f"; resume with: moe {shlex.join(words)}"


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    # Lightning's per-run banners (GPU available, etc.) drown the progress bar on a laptop
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    # a resume keeps the metrics logged before it (moe/train/tracking.py `_csv_logger`)
    warnings.filterwarnings("ignore", message="Experiment logs directory .* is not empty")
    # a fork (a study's branches, the monolith) restores another run's state into a new dir
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    parser = build_parser()
    # key=value overrides may come after options (`moe run r.yaml --stage x a=b`): argparse
    # leaves such trailing positionals unrecognised, so they are collected here
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            if hasattr(args, "overrides") and all(
                "=" in e and not e.startswith("-") for e in extra
            ):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or an argument mistake (2), already printed
        return e.code if isinstance(e.code, int) else 2
    from moe.train.signals import Interrupted, handled

    try:
        # SIGTERM/SIGINT: one line, exit 143/130; training first saves where it can resume
        with handled():
            return int(args.func(args) or 0)
    except ConfigError as e:
        if os.environ.get("MOE_DEBUG"):
            raise
        print(f"moe: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if os.environ.get("MOE_DEBUG"):
            raise
        if not isinstance(e, Interrupted):  # a SIGINT before the handler was in place
            import signal

            e = Interrupted(signal.SIGINT)
        from moe.io.rundir import launch_rank_is_zero

        if launch_rank_is_zero():  # the other ranks of a multi-process launch stop quietly
            print(f"moe: {e}{_resume_hint(args, e, argv)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # the reader went away (`moe ... | head`): stop quietly, as Unix tools do; point stdout
        # at devnull so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        from moe.train.module import NonFiniteLossError

        if isinstance(e, NonFiniteLossError) and not os.environ.get("MOE_DEBUG"):
            print(f"moe: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
