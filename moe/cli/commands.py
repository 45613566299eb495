"""The subcommands' handlers: each parses nothing and decides nothing, it calls the library
function that does the work and prints where the result went (moe/cli/__init__.py wires them
to argparse)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe.config import ConfigError


def _recipe(args) -> object:
    from moe.config import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    return load_recipe(args.recipe, overrides)


def cmd_train(args) -> int:
    from moe.train.stages import train

    out = train(_recipe(args))
    print(out)
    return 0


def cmd_run(args) -> int:
    from moe.experiments import experiment_of
    from moe.experiments.study import check_jobs, dry_run, run_study

    if args.list_arms:
        from moe.experiments.study.arms import ARMS

        for name, arm in ARMS.items():  # in the report's order
            print(f"{name:16s} {arm.description}")
        return 0
    if args.recipe is None:
        raise ConfigError("moe run needs a recipe file (or --list-arms)")
    check_jobs(args.jobs, args.stage)
    recipe = _recipe(args)
    experiment = experiment_of(recipe)  # init_study, ... (moe/experiments/); else the study
    if experiment is not None:
        if args.jobs > 1:
            raise ConfigError(f"--jobs runs a study's seeds or stages in parallel; the "
                              f"{experiment.section} experiment runs in one process: drop --jobs")
        if args.dry_run:
            print(experiment.plan(recipe, args.seeds))
        else:
            print(experiment.run(recipe, args.seeds, args.recipe))
        return 0
    if args.dry_run:  # the run's own checks, then its plan
        print(dry_run(recipe, only=args.stage, seeds=args.seeds))
        return 0
    report = run_study(recipe, only=args.stage, seeds=args.seeds, recipe_path=args.recipe,
                       jobs=args.jobs)
    print(report)
    return 0


def cmd_sweep(args) -> int:
    from moe.experiments.study import check_jobs
    from moe.experiments.study.sweep import run_sweep

    check_jobs(args.jobs)
    out = run_sweep(args.recipe, list(args.overrides), seeds=args.seeds,
                    overwrite=args.overwrite, dry_run=args.dry_run, jobs=args.jobs)
    print(out)
    return 0


def cmd_eval(args) -> int:
    from moe.eval.evaluate import evaluate_checkpoint, format_table, resolve_checkpoint
    from moe.eval.rolling import check_protocol
    from moe.io.checkpoint import read_config
    from moe.io.output import claim

    doms = args.domains.split(",") if args.domains else None
    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json} is a directory; give a file name")
    experts = _names(args.experts) if args.experts is not None else None
    subset = experts is not None or args.expert_top_k is not None
    if args.tasks is not None:
        if subset:
            raise ConfigError("--experts and --expert-top-k belong to moe eval's own held-out "
                              "evaluation, not to --tasks (write the subset with moe experts)")
        return _eval_tasks(args, doms)
    for flag, value in (("--include-path", args.include_path), ("--limit", args.limit),
                        ("--num-fewshot", args.num_fewshot), ("--device", args.device)):
        if value is not None:
            raise ConfigError(f"{flag} belongs to --tasks (lm-evaluation-harness tasks)")
    data = None
    if args.data:
        from moe.eval.data_spec import parse_data_spec

        data = parse_data_spec(args.data)  # every mistake in it stops here, before any work
    if args.max_batches is not None:
        raise ConfigError("--max-batches was replaced by --max-docs N: moe eval scores whole "
                          "documents at the model's context (see moe eval --help)")
    # results on other data, or of a subset of the experts, never replace the checkpoint's own
    # eval.json
    name = "eval" + ("-data" if data is not None else "") + ("-experts" if subset else "") + ".json"
    for path in args.checkpoints:
        # a missing checkpoint, or a context or stride it cannot take, before any work
        cfg = read_config(resolve_checkpoint(path)).resolved()
        check_protocol(args.context, args.stride, args.max_docs, cfg.max_seq_len)
        if subset:  # an unknown expert, none left, a top-k out of range: before any work
            from moe.model.expert_subset import plan_experts

            plan_experts(cfg, keep=experts, top_k=args.expert_top_k, where=str(path),
                         keep_flag="--experts", k_flag="--expert-top-k")
    targets = [args.json] if args.json else [Path(p) / name for p in args.checkpoints]
    inputs = [*args.checkpoints, args.tokenizer, *(data.input_paths() if data else [])]
    with claim(targets, inputs):  # before evaluating: a refused output costs no work
        reports = []
        for path in args.checkpoints:
            rep = evaluate_checkpoint(
                path,
                doms,
                batch_size=args.batch_size,
                progress=sys.stderr.isatty(),
                data=data,
                tokenizer=args.tokenizer,
                context=args.context,
                stride=args.stride,
                max_docs=args.max_docs,
                experts=experts,
                expert_top_k=args.expert_top_k,
            )
            for note in rep.get("experts_subset", {}).get("notes", []):
                print(f"note: {path}: {note}", file=sys.stderr)
            reports.append(rep)
        print(format_table(reports))
        _write_reports(args.json, targets, reports)
    return 0


def _write_reports(json_path: str | None, targets: list, reports: list[dict]) -> None:
    """`--json F`: every report in F (a list when more than one); else each in its target."""
    from moe.io.checkpoint import write_json

    if json_path:
        write_json(json_path, reports if len(reports) > 1 else reports[0])
        return
    for target, rep in zip(targets, reports):
        write_json(target, rep)
        print(f"wrote {target}", file=sys.stderr)


def _eval_tasks(args, doms: list[str] | None) -> int:
    """`moe eval CK --tasks T1,T2`: lm-evaluation-harness tasks on each checkpoint, lm-eval's
    results as JSON (lm-eval.json in each checkpoint directory, or --json) and its table."""
    from moe.eval import harness
    from moe.eval.evaluate import resolve_checkpoint
    from moe.io.checkpoint import read_config
    from moe.io.output import claim

    for flag, value in (("--data", args.data), ("--stride", args.stride),
                        ("--max-docs", args.max_docs), ("--max-batches", args.max_batches)):
        if value is not None:
            raise ConfigError(f"{flag} belongs to moe eval's own held-out evaluation, not to "
                              "--tasks (lm-eval tasks choose their own documents; --limit N "
                              "samples them)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one lm-eval task name or YAML file")
    if doms is not None and len(doms) != 1:
        raise ConfigError("with --tasks, --domains names one domain: the expert a domain-routed "
                          f"MoE uses (got {args.domains})")
    for path in args.checkpoints:  # a missing checkpoint or a context too long, before any work
        max_len = read_config(resolve_checkpoint(path)).resolved().max_seq_len
        if args.context is not None and args.context > max_len:
            raise ConfigError(f"--context {args.context}: must be between 1 and the model's "
                              f"context ({max_len} tokens)")
    harness.task_manager(tasks, args.include_path)  # lm-eval missing, unknown task: one line
    targets = [args.json] if args.json else [Path(p) / "lm-eval.json" for p in args.checkpoints]
    inputs = [*args.checkpoints, args.tokenizer]
    extra = {k: v for k, v in (("max_length", args.context), ("tokenizer", args.tokenizer))
             if v is not None}  # fmt: skip
    with claim(targets, inputs):
        reports = []
        for path in args.checkpoints:
            res = harness.run_tasks(path, tasks, include_path=args.include_path,
                                    domain=doms[0] if doms else None,
                                    batch_size=args.batch_size, limit=args.limit,
                                    device=args.device, num_fewshot=args.num_fewshot,
                                    model_args=extra)  # fmt: skip
            res["checkpoint"] = str(path)
            reports.append(res)
            print(f"{path}:")
            print(harness.format_results(res))
        _write_reports(args.json, targets, reports)
    return 0


def cmd_data(args) -> int:
    from moe.data.datamodule import DomainDataModule

    r = _recipe(args)
    dm = DomainDataModule(r.data, seed=r.seed)
    rows = dm.describe()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    cols = [
        "domain",
        "documents",
        "bytes",
        "train_documents",
        "heldout_documents",
        "train_sequences",
        "heldout_sequences",
    ]
    print("| " + " | ".join(cols) + " | origin |")
    print("|" + "---|" * (len(cols) + 1))
    for row in rows:
        cells = [
            f"{row.get(c):,}" if isinstance(row.get(c), int) else str(row.get(c)) for c in cols
        ]
        print("| " + " | ".join(cells) + f" | {row.get('origin', '')} |")
    return 0


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_split(args) -> int:
    from moe.surgery.experts import split_checkpoint

    out = split_checkpoint(
        args.checkpoint, args.out, _names(args.experts), method=args.method, router=args.router,
        top_k=args.top_k, shared_dim=args.shared_dim, seed=args.seed,
        calib_batches=args.calib_batches, overwrite=args.overwrite,
    )
    print(out)
    return 0


def cmd_init(args) -> int:
    from moe.surgery.init import init_checkpoint

    out = init_checkpoint(
        args.source, args.method, args.out, seed=args.seed, keep_norms=args.keep_norms,
        keep_embeddings=args.keep_embeddings, overrides=list(args.overrides),
        overwrite=args.overwrite,
    )
    print(out)
    return 0


def cmd_importance(args) -> int:
    from moe.surgery.importance import importance_checkpoint

    out = importance_checkpoint(
        args.checkpoint, _names(args.domains), args.out, batches=args.batches,
        batch_size=args.batch_size, overwrite=args.overwrite,
    )
    print(out)
    return 0


def cmd_prune(args) -> int:
    from moe.surgery.prune import prune_checkpoint

    out = prune_checkpoint(
        args.checkpoint, args.out, heads=args.heads, ffn=args.ffn, layers=args.layers,
        by=args.by, method=args.method, scores_path=args.scores,
        domains=_names(args.domains) if args.domains else None, calib_batches=args.batches,
        heal_steps=args.heal_steps, heal_lr=args.heal_lr, unstructured=args.unstructured,
        bits=args.bits, group=args.group, seed=args.seed, allow_empty=args.allow_empty,
        overwrite=args.overwrite,
    )
    print(out)
    return 0


def cmd_grow(args) -> int:
    from moe.surgery.grow import GrowSpec, grow_checkpoint, parse_ints, parse_range

    spec = GrowSpec(
        ffn_dim=args.ffn_dim, dim=args.dim, kv_heads=args.kv_heads, method=args.method,
        noise=args.noise, identity_after=parse_ints(args.identity_after, "--identity-after"),
        duplicate=parse_range(args.duplicate, "--duplicate"),
        layers=parse_ints(args.layers, "--layers"), seed=args.seed,
    )
    print(grow_checkpoint(args.checkpoint, args.out, spec, overwrite=args.overwrite))
    return 0


def cmd_shrink(args) -> int:
    from moe.surgery.grow import parse_ints
    from moe.surgery.shrink import ShrinkSpec, shrink_checkpoint

    spec = ShrinkSpec(
        drop_layers=parse_ints(args.drop_layers, "--drop-layers"), bi_layers=args.bi_layers,
        by=args.by, calib_batches=args.calib_batches, ffn=args.ffn, heads=args.heads,
        channels=args.channels, select=args.select, seed=args.seed,
    )
    print(shrink_checkpoint(args.checkpoint, args.out, spec, heal_steps=args.heal_steps,
                            overrides=list(args.overrides), overwrite=args.overwrite))
    return 0


def cmd_retokenize(args) -> int:
    from moe.surgery.retokenize import retokenize_checkpoint

    print(retokenize_checkpoint(
        args.checkpoint, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        init=args.init, steps=args.steps, freeze_body=args.freeze_body,
        overrides=list(args.overrides), seed=args.seed, overwrite=args.overwrite,
    ))  # fmt: skip
    return 0


def cmd_assemble(args) -> int:
    from moe.surgery.experts import assemble_checkpoints

    if len(args.branches) == 1 and Path(args.branches[0]).suffix in (".yaml", ".yml"):
        return _assemble_config(args)
    for flag, value in (("--hf-out", args.hf_out), ("--max-shard-size", args.max_shard_size)):
        if value is not None:
            raise ConfigError(f"{flag} belongs to assembling a mergekit-moe config (moe assemble "
                              "CONFIG.yaml --out DIR)")
    out = assemble_checkpoints(
        args.branches, args.out, experts=_names(args.experts) if args.experts else None,
        shared=args.shared, base=args.base, router=args.router, top_k=args.top_k,
        router_init=args.router_init, seed=args.seed, overwrite=args.overwrite,
    )
    print(out)
    return 0


def _assemble_config(args) -> int:
    """`moe assemble CONFIG.yaml --out DIR`: the branch-assembly options do not apply."""
    from moe.surgery.mergekit_moe import assemble_from_config

    for flag, value, default in (("--experts", args.experts, None), ("--shared", args.shared,
                                 "average"), ("--base", args.base, None), ("--router",
                                 args.router, "learned"), ("--top-k", args.top_k, None),
                                 ("--router-init", args.router_init, "random")):  # fmt: skip
        if value != default:
            raise ConfigError(f"{flag} belongs to assembling branches; a mergekit-moe config "
                              "sets base_model, experts_per_token and gate_mode itself")
    out = assemble_from_config(
        args.branches[0], args.out, hf_out=args.hf_out, seed=args.seed, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size or "5GB",
    )
    print(out)
    return 0


def cmd_experts(args) -> int:
    from moe.surgery.experts_subset import experts_checkpoint

    notes: list[str] = []
    out = experts_checkpoint(
        args.checkpoint, args.out, keep=_names(args.keep) if args.keep is not None else None,
        drop=_names(args.drop) if args.drop is not None else None, add=args.add,
        top_k=args.top_k, router_row=args.router_row, calib_batches=args.calib_batches,
        overwrite=args.overwrite, notes=notes,
    )  # fmt: skip
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(out)
    return 0


def cmd_merge(args) -> int:
    from moe.merge import merge

    out = merge(args.config, out=args.out, overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(out)
    return 0


def cmd_delta(args) -> int:
    from moe.delta import ops

    if args.action == "extract":
        info = ops.extract(args.base, args.finetune, args.out, overwrite=args.overwrite,
                           allow_cross_family=args.allow_cross_family)
    elif args.action == "compress":
        info = ops.compress(args.delta, args.method, args.out, seed=args.seed,
                            overwrite=args.overwrite)
    elif args.action == "apply":
        print(ops.apply_delta(args.base, args.delta, args.out, overwrite=args.overwrite,
                              scale=args.scale))
        return 0
    else:
        info = ops.info(args.delta)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        out = f"{args.out}: " if getattr(args, "out", None) else ""
        ranks = f", lowrank rank {info['lowrank_ranks']}" if info["lowrank_ranks"] else ""
        print(f"{out}{info['bytes']} bytes ({info['bytes_per_parameter']:.3f} per parameter, "
              f"{info['parameters']} parameters), method {info['method']}, density "
              f"{info['density']:.4f}{ranks}, base {info['base_id']}, family {info['family']}, "
              f"exact {info['exact']}")
    return 0


def cmd_import(args) -> int:
    from moe.io.hf import import_hf

    out = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    print(out)
    from moe.data.tokenizer import TOKENIZER_DIR

    if not (Path(out) / TOKENIZER_DIR).is_dir():
        print(f"note: {args.hf_dir} has no tokenizer files; pass the model's tokenizer to train "
              "(data.tokenizer=PATH) and evaluate (moe eval --tokenizer PATH)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from moe.eval.evaluate import resolve_checkpoint
    from moe.io.hf_export import export_hf

    ckpt = resolve_checkpoint(args.checkpoint)
    print(export_hf(ckpt, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size))
    return 0


def cmd_generate(args) -> int:
    from moe.generate.command import generate_command

    generate_command(
        args.checkpoint, prompt=args.prompt, prompt_file=args.prompt_file,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, domain=args.domain, show_routing=args.show_routing,
        layer=args.layer, html=args.html, json_path=args.json, color=args.color,
        device=args.device, tokenizer=args.tokenizer,
        experts=_names(args.experts) if args.experts is not None else None,
        expert_top_k=args.expert_top_k,
    )  # fmt: skip
    return 0
