"""Structured pruning by importance (`moe prune`): remove attention heads, FFN neurons and whole
layers, writing a smaller, valid checkpoint (fewer FLOPs; it loads, trains, merges and exports).

Units and scores (moe/surgery/importance.py):
    layers  the `--layers N` blocks of lowest Block Influence (`random`: N at random)
    heads   key/value groups (a group's query heads go together, so the model stays a valid
            grouped-query Llama): round(f * n_kv_heads) per layer, lowest kv.taylor (mask
            gradient) or kv.magnitude first
    ffn     neurons: round(f * F) per layer (per expert for an MoE), lowest ffn.taylor or
            ffn.magnitude first

Pruning is uniform per layer: every layer loses the same number of units (the model has one
n_heads and one ffn_dim, so it exports to Hugging Face), but each layer chooses its own units
by its own scores. Scores are computed once on the unpruned model (one shot). `--by DOMAIN`
uses that domain's calibration scores; `--by all` the mean over the scored domains of each
score normalised by its mean.

The structural edits are moe/surgery/structure.py's (`select_layers`, `keep_heads`, `keep_ffn`);
`plan_masks` turns a plan into the masks under which the original model computes exactly what
the pruned one does (the test of every plan).

A layer whose every head would go is refused unless `--allow-empty` (the model then runs with
n_heads = 0: attention adds nothing; such a model does not export). An FFN cannot have zero
neurons: with `--allow-empty` an emptied FFN keeps one neuron whose output weights are zero,
which computes exactly an empty FFN.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.config import ConfigError, ModelConfig
from moe.surgery.structure import ffn_hidden, keep_ffn, keep_heads, select_layers

METHODS = ("taylor", "magnitude", "random")


@dataclass
class PrunePlan:
    layers: list[int]  # the original layers kept, in order
    kv: list[list[int]] | None  # per kept layer: the key/value groups kept (None: all)
    ffn: list[list[list[int]]] | None  # per kept layer, per expert (1 for dense): neurons kept
    zero_ffn: bool = False  # every neuron went (--allow-empty): the one kept writes zeros

    def digest(self) -> str:
        """sha256 of the kept units: two prunes of one checkpoint hold the same units at the
        same positions (and so may be merged) only when their digests agree."""
        import hashlib
        import json

        blob = json.dumps([self.layers, self.kv, self.ffn, self.zero_ffn])
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self, cfg: ModelConfig) -> dict:
        c = cfg.resolved()
        return {
            "units_sha256": self.digest(),
            "layers_kept": list(self.layers),
            "layers_removed": [i for i in range(c.n_layers) if i not in self.layers],
            "kv_heads": [len(k) for k in self.kv][0] if self.kv else c.n_kv_heads,
            "ffn_neurons": 0 if self.zero_ffn else (
                len(self.ffn[0][0]) if self.ffn else ffn_hidden(c)),  # fmt: skip
        }


def n_removed(n: int, frac: float, what: str, allow_empty: bool) -> int:
    """round(frac * n) units out of n; a fraction outside [0, 1) or every unit without
    `allow_empty` is a one-line error."""
    if not (isinstance(frac, (int, float)) and math.isfinite(frac) and 0.0 <= frac < 1.0):
        raise ConfigError(f"--{what} {frac}: a fraction in [0, 1) is needed")
    r = int(round(frac * n))
    if r >= n and n > 0 and not allow_empty:
        unit = "key/value head groups" if what == "heads" else "FFN neurons"
        raise ConfigError(
            f"--{what} {frac} would remove all {n} {unit} of every layer"
            f"{' (expert)' if what == 'ffn' else ''}; pass --allow-empty to allow it"
        )
    return min(r, n)


def _lowest_first(score: torch.Tensor, method: str, gen: torch.Generator) -> torch.Tensor:
    """Unit indices from the least to the most important (ties: lower index first)."""
    if method == "random":
        return torch.randperm(score.numel(), generator=gen)
    return torch.argsort(score.double(), stable=True)


def _keep(score: torch.Tensor, remove: int, method: str, gen: torch.Generator) -> list[int]:
    order = _lowest_first(score, method, gen)
    return sorted(order[remove:].tolist())


def plan_pruning(
    cfg: ModelConfig,
    scores: dict[str, torch.Tensor] | None,
    heads: float = 0.0,
    ffn: float = 0.0,
    layers: int = 0,
    method: str = "taylor",
    seed: int = 0,
    allow_empty: bool = False,
) -> PrunePlan:
    """Which layers, key/value groups and neurons to keep. `scores`: one domain's (or `combine`d)
    scores of the unpruned model; None only for method=random."""
    c = cfg.resolved()
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if scores is None and method != "random":
        raise ConfigError(f"--method {method} needs importance scores")
    if not isinstance(layers, int) or not 0 <= layers < c.n_layers:
        raise ConfigError(f"--layers {layers}: remove 0 to {c.n_layers - 1} of the model's "
                          f"{c.n_layers} layers")  # fmt: skip
    rm_kv = n_removed(c.n_kv_heads, heads, "heads", allow_empty)
    fh = ffn_hidden(c)
    rm_ffn = n_removed(fh, ffn, "ffn", allow_empty)
    gen = torch.Generator().manual_seed(seed)
    L = c.n_layers
    if layers:
        infl = scores["layers.influence"] if scores is not None else torch.zeros(L)
        kept_layers = _keep(infl, layers, method, gen)
    else:
        kept_layers = list(range(L))
    kv = None
    if rm_kv:
        s = scores[f"kv.{method}"] if method != "random" else torch.zeros(L, c.n_kv_heads)
        kv = [_keep(s[i], rm_kv, method, gen) for i in kept_layers]
    ff = None
    zero_ffn = rm_ffn >= fh
    if rm_ffn:
        s = scores[f"ffn.{method}"] if method != "random" else torch.zeros(L, fh)
        n_rm = fh - 1 if zero_ffn else rm_ffn  # an emptied FFN keeps one neuron writing zeros
        rows = [s[i] if s.dim() == 3 else s[i].unsqueeze(0) for i in kept_layers]  # (E|1, F)
        ff = [[_keep(r[e], n_rm, method, gen) for e in range(r.shape[0])] for r in rows]
    return PrunePlan(kept_layers, kv, ff, zero_ffn)


def apply_plan(cfg: ModelConfig, sd: dict[str, torch.Tensor], plan: PrunePlan,
               allow_empty: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The pruned (config, state dict)."""
    c = cfg.resolved()
    if plan.layers != list(range(c.n_layers)):
        c, sd = select_layers(c, sd, plan.layers)
    if plan.kv is not None:
        c, sd = keep_heads(c, sd, plan.kv, allow_empty=allow_empty)
    if plan.ffn is not None:
        spec = plan.ffn if c.moe.experts else [e[0] for e in plan.ffn]
        c, sd = keep_ffn(c, sd, spec)
        if plan.zero_ffn:
            sd = {k: (torch.zeros_like(t) if k.endswith(("ffn.w2.weight", "ffn.w2")) else t)
                  for k, t in sd.items()}  # fmt: skip
    return c.resolved(), sd


def plan_masks(cfg: ModelConfig, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Masks on the *original* model (moe.surgery.importance.masked) that compute what the
    pruned model computes: head_mask (L, H), ffn_mask (L, F) or (L, E, Fe), layer_mask (L,)."""
    c = cfg.resolved()
    L, H, Hkv, fh = c.n_layers, c.n_heads, c.n_kv_heads, ffn_hidden(c)
    g = H // Hkv if Hkv else 1
    E = len(c.moe.experts)
    layer = torch.zeros(L)
    layer[plan.layers] = 1.0
    head = torch.ones(L, H)
    ffn = torch.ones(L, E, fh) if E else torch.ones(L, fh)
    for j, i in enumerate(plan.layers):
        if plan.kv is not None:
            head[i] = 0.0
            for k in plan.kv[j]:
                head[i, k * g:(k + 1) * g] = 1.0
        if plan.ffn is not None:
            m = torch.zeros(max(E, 1), fh)
            for e, keep in enumerate(plan.ffn[j]):
                if not plan.zero_ffn:
                    m[e, keep] = 1.0
            ffn[i] = m if E else m[0]
    return {"head_mask": head, "ffn_mask": ffn, "layer_mask": layer}


# ----------------------------------------------------------------------------- healing


def heal(model, data, seed: int, steps: int, lr: float, domain: str | None, tokenizer,
         progress: bool = True) -> dict:  # fmt: skip
    """Fine-tune a pruned model `steps` steps (the domain's stream, or the mixed one for None)
    with AdamW, a short warm-up and a linear decay; the train split only."""
    from moe.config import OptimConfig
    from moe.data.datamodule import DomainDataModule
    from moe.train.loop import make_optimizer, train_steps

    cfg = data if domain is None else dataclasses.replace(
        data, domains=[domain], stream="separate", weights={})  # fmt: skip
    dm = DomainDataModule(cfg, seed=seed, tokenizer=tokenizer)
    dm.setup("fit")
    optim = OptimConfig(lr=lr, schedule="cosine", warmup_steps=max(1, steps // 10),
                        min_lr_ratio=0.0)  # fmt: skip
    opt, sched = make_optimizer(model, optim, steps)
    done = train_steps(model, opt, dm.train_batches(0), steps, sched=sched,
                       domain_names=dm.domain_names, grad_clip=1.0,
                       progress="heal" if progress else None)  # fmt: skip
    if done.diverged_at is not None:
        raise ConfigError(f"heal: the loss is not finite at step {done.diverged_at}; lower "
                          "--heal-lr")  # fmt: skip
    model.eval()
    tokens = steps * cfg.batch_size * cfg.seq_len
    return {"steps": steps, "tokens": tokens,
            "final_loss": done.losses[-1] if done.losses else None, "domain": domain or "all"}


# ----------------------------------------------------------------------------- checkpoints


def prune_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    heads: float = 0.0,
    ffn: float = 0.0,
    layers: int = 0,
    by: str = "all",
    method: str = "taylor",
    scores_path: str | os.PathLike | None = None,
    domains: list[str] | None = None,
    calib_batches: int = 8,
    heal_steps: int = 0,
    heal_lr: float = 1e-3,
    unstructured: float = 0.0,
    bits: int = 16,
    group: int = 32,
    seed: int = 0,
    allow_empty: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """`moe prune`: every check first, then the pruned checkpoint (lineage, tokenizer carried)."""
    from moe.data.datamodule import domain_names
    from moe.data.tokenizer import carried_tokenizer, checkpoint_tokenizer
    from moe.eval.evaluate import data_config_of, resolve_checkpoint
    from moe.io.checkpoint import CheckpointError, load_checkpoint, make_meta, save_checkpoint
    from moe.io.output import claim
    from moe.model.flops import count_params, train_flops_per_token
    from moe.model.transformer import Transformer
    from moe.surgery import importance as imp
    from moe.surgery.quantize import compress_state

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"checkpoint {out} already exists (pass --overwrite to replace it)")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if heal_steps < 0:
        raise ConfigError(f"--heal-steps must be >= 0, got {heal_steps}")
    if not (math.isfinite(heal_lr) and heal_lr > 0):
        raise ConfigError(f"--heal-lr must be a positive number, got {heal_lr}")
    if not (math.isfinite(unstructured) and 0.0 <= unstructured < 1.0):
        raise ConfigError(f"--unstructured {unstructured}: a fraction in [0, 1) is needed")
    if bits not in (16, 8, 4):
        raise ConfigError(f"--bits {bits}: choose 16 (no quantization), 8 or 4")
    with claim(out, [ckpt, scores_path]):  # moe/io/output.py
        ckpt_dir = resolve_checkpoint(ckpt)
        ck = load_checkpoint(ckpt_dir)
        cfg = ck.config.resolved()
        data, dseed = data_config_of(ck.meta)
        data = dataclasses.replace(data, seq_len=min(data.seq_len, cfg.max_seq_len))
        tok = checkpoint_tokenizer(ckpt_dir, cfg.vocab_size)
        # the fractions and counts are checked before any scoring
        n_removed(cfg.n_kv_heads, heads, "heads", allow_empty)
        n_removed(ffn_hidden(cfg), ffn, "ffn", allow_empty)
        if not isinstance(layers, int) or not 0 <= layers < cfg.n_layers:
            raise ConfigError(f"--layers {layers}: remove 0 to {cfg.n_layers - 1} of the model's "
                              f"{cfg.n_layers} layers")  # fmt: skip
        model = Transformer.from_state(cfg, ck.state_dict)
        scores = None
        needs_scores = method != "random" and (heads or ffn or layers)
        if needs_scores and scores_path is not None:
            per_domain, info = imp.load_scores(scores_path)
            imp.check_scores_for(info, ckpt_dir, scores_path)
            scores = imp.combine(per_domain, by)
        elif needs_scores:
            doms = list(domains) if domains else ([by] if by != "all" else list(data.domains))
            if by != "all" and by not in doms:
                raise ConfigError(f"--by {by}: not one of --domains {', '.join(doms)}")
            names = domain_names(data)
            per_domain = {
                d: imp.compute_importance(
                    model, imp.calibration_batches(data, dseed, d, calib_batches, data.batch_size,
                                                   tok), names, progress, f"importance {d}")
                for d in doms
            }  # fmt: skip
            scores = imp.combine(per_domain, by)
        plan = plan_pruning(cfg, scores, heads, ffn, layers, method, seed, allow_empty)
        new_cfg, sd = apply_plan(cfg, ck.state_dict, plan, allow_empty)
        healed = None
        if heal_steps:
            pruned = Transformer.from_state(new_cfg, sd)
            healed = heal(pruned, data, dseed + 1, heal_steps, heal_lr, None if by == "all" else by,
                          tok, progress)  # fmt: skip
            sd = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
        sd, compression = compress_state(new_cfg, sd, unstructured, bits, group)
        heal_flops = (healed["tokens"] * train_flops_per_token(new_cfg, data.seq_len)
                      if healed else 0)  # fmt: skip
        info = {"from": str(ckpt_dir), "heads": heads, "ffn": ffn, "layers": layers, "by": by,
                "method": method, "seed": seed,
                "scores": str(scores_path) if scores_path else None,
                "allow_empty": allow_empty, "plan": plan.describe(cfg), "heal": healed,
                "params_before": count_params(cfg).total,
                "params_after": count_params(new_cfg).total,
                "compression": compression}  # fmt: skip
        meta = make_meta(
            kind="prune",
            parents=[ck.meta.get("id")],
            base_id=ck.meta.get("base_id") or ck.meta.get("id"),
            family=ck.meta.get("family"),
            domain=ck.meta.get("domain"),
            tokens_seen=int(ck.meta.get("tokens_seen", 0)) + (healed["tokens"] if healed else 0),
            train_flops=float(ck.meta.get("train_flops", 0.0)) + heal_flops,
            # the source's recipe: its data section is what eval/importance of the result read
            recipe=ck.meta.get("recipe"),
            prune=info,
        )
        return save_checkpoint(out, sd, new_cfg, meta, overwrite=overwrite,
                               tokenizer=carried_tokenizer(ckpt_dir, cfg.vocab_size))  # fmt: skip
