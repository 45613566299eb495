"""Importance of every attention head, FFN neuron and layer, per domain (`moe importance`).

Scores come from calibration batches of one domain's *training* split (never held-out data),
so pruning by them leaves the evaluation clean. For each unit:

    heads.taylor      E_batch |dL/dm_h|: the gradient of the loss w.r.t. a mask m_h that scales
                      head h's output (Michel et al. 2019, "Are Sixteen Heads Really Better than
                      One?"). To first order, removing the head changes the loss by -dL/dm_h.
    kv.taylor         the same for a whole key/value group (its query heads masked together:
                      the unit structural pruning removes under grouped-query attention)
    heads.magnitude   mean L2 norm of the head's output per token (input of wo)
    kv.magnitude      the sum of its query heads' magnitudes
    ffn.taylor        E_batch |sum_t a_j(t) dL/da_j(t)|: first-order Taylor estimate of removing
                      neuron j (Molchanov et al. 2019), a_j = silu(w1 x)_j (w3 x)_j
    ffn.magnitude     mean |a_j| per token (MoE: over the tokens routed to the expert)
    layers.influence  Block Influence (Men et al. 2024, ShortGPT): 1 - mean cos(x_in, x_out) of
                      the block's residual stream; a block that barely turns it is removable

The mask gradients need no masks: a mask m_u scaling unit u's output enters the loss only
through its outgoing weights, so dL/dm_u = <W_u, dL/dW_u> over the unit's columns of wo (head)
or rows of w2 (neuron), with W at m = 1. One backward per batch gives every unit's score;
`mask_gradients_by_hooks` is the slow reference with explicit masks the tests compare against.

Shapes: L layers, H heads, Hkv key/value heads, F FFN neurons, E experts, Fe expert neurons;
FFN scores are (L, F) for a dense model and (L, E, Fe) for an MoE.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from moe.config import DOMAINS, ConfigError, DataConfig
from moe.model.transformer import IGNORE_INDEX, Transformer

KINDS = ("heads", "kv", "ffn", "layers")
SCORE_NAMES = ("heads.taylor", "kv.taylor", "heads.magnitude", "kv.magnitude", "ffn.taylor",
               "ffn.magnitude", "layers.influence")  # fmt: skip


def _moe(model: Transformer) -> bool:
    return bool(model.config.moe.experts)


def _loss(model: Transformer, batch: dict, hint: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per target token) of one batch; no router losses."""
    out = model(batch["input_ids"], domain=hint)
    logits = out.logits  # (B, L, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX)  # fmt: skip


def _hint(model: Transformer, batch: dict, domain_names: list[str] | None) -> torch.Tensor | None:
    """Expert ids for a domain-routed MoE (each sequence to its domain's expert)."""
    m = model.config.moe
    if not m.experts or m.router != "domain":
        return None
    from moe.model.moe_layer import domain_to_expert

    hint = domain_to_expert(list(domain_names or DOMAINS), list(m.experts))[batch["domain"]]
    if (hint < 0).any():
        raise ConfigError("importance: a calibration domain has no expert in this model")
    return hint


def weight_mask_gradients(model: Transformer) -> dict[str, torch.Tensor]:
    """dL/dm per head (L, H) and per FFN neuron (L, F) or (L, E, Fe), from the weights' .grad
    after a backward: <W_u, dL/dW_u> over each unit's outgoing weights."""
    cfg = model.config
    H, Dh = cfg.n_heads, cfg.head_size()
    heads, ffn = [], []
    for lay in model.layers:
        wo = lay.attn.wo.weight  # (C, H * Dh)
        g = wo.grad if wo.grad is not None else torch.zeros_like(wo)
        heads.append((wo.detach() * g).view(-1, H, Dh).sum(dim=(0, 2)))  # (H,)
        if _moe(model):
            w2 = lay.ffn.w2  # (E, Fe, C)
            g2 = w2.grad if w2.grad is not None else torch.zeros_like(w2)
            ffn.append((w2.detach() * g2).sum(-1))  # (E, Fe)
        else:
            w2 = lay.ffn.w2.weight  # (C, F)
            g2 = w2.grad if w2.grad is not None else torch.zeros_like(w2)
            ffn.append((w2.detach() * g2).sum(0))  # (F,)
    return {"heads": torch.stack(heads).double(), "ffn": torch.stack(ffn).double()}


def kv_groups(heads_LH: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum each key/value group's query heads (consecutive, as repeat_interleave shares them)."""
    L, H = heads_LH.shape
    if n_kv_heads == 0:
        return heads_LH.new_zeros(L, 0)
    return heads_LH.view(L, n_kv_heads, H // n_kv_heads).sum(-1)  # (L, Hkv)


class _Recorder:
    """Forward hooks collecting head output norms and FFN activation magnitudes over the
    batches of one domain."""

    def __init__(self, model: Transformer):
        cfg = model.config
        self.model, self.L, self.H, self.Dh = model, cfg.n_layers, cfg.n_heads, cfg.head_size()
        self.head_norm = torch.zeros(self.L, self.H, dtype=torch.float64)
        self.tokens = 0
        moe = _moe(model)
        shape = (self.L, len(cfg.moe.experts), model.layers[0].ffn.w1.shape[-1]) if moe else (
            self.L, cfg.ffn_dim)  # fmt: skip
        self.act = torch.zeros(shape, dtype=torch.float64)
        self.routed = torch.zeros(shape[:-1], dtype=torch.float64)  # tokens per (layer, expert)
        self.handles = []
        for i, lay in enumerate(model.layers):
            self.handles.append(lay.attn.wo.register_forward_pre_hook(self._heads(i)))
            if moe:
                self.handles.append(lay.ffn.register_forward_hook(self._experts(i)))
            else:
                self.handles.append(lay.ffn.w2.register_forward_pre_hook(self._ffn(i)))

    def _heads(self, i: int):
        def hook(mod, args):
            y = args[0].detach()  # (B, L, H * Dh)
            B, L = y.shape[:2]
            self.head_norm[i] += y.view(B, L, self.H, self.Dh).norm(dim=-1).double().sum((0, 1))
            if i == 0:
                self.tokens += B * L

        return hook

    def _ffn(self, i: int):
        def hook(mod, args):
            self.act[i] += args[0].detach().abs().double().sum((0, 1))  # (F,)

        return hook

    def _experts(self, i: int):
        def hook(mod, args, out):
            x = args[0].detach().flatten(0, 1)  # (T, D)
            ids = mod.last_stats["expert_ids"]  # (N, K)
            for e in range(mod.num_experts):
                rows = (ids == e).any(-1)  # (N,)
                if rows.any():
                    xe = x[rows]  # (n_e, C)
                    a = F.silu(xe @ mod.w1[e].detach()) * (xe @ mod.w3[e].detach())  # (n_e, Fe)
                    self.act[i, e] += a.abs().double().sum(0)
                    self.routed[i, e] += int(rows.sum())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def results(self, batches: int) -> dict[str, torch.Tensor]:
        n = max(self.tokens, 1)
        if _moe(self.model):
            act = self.act / self.routed.clamp(min=1).unsqueeze(-1)
        else:
            act = self.act / n
        return {"heads.magnitude": self.head_norm / n, "ffn.magnitude": act}


def compute_importance(
    model: Transformer, batches: list[dict], domain_names: list[str] | None = None,
    progress: bool = False, desc: str = "importance",
) -> dict[str, torch.Tensor]:
    """Every score of SCORE_NAMES (float64 tensors, shapes in the module docstring) over
    `batches` (dicts with input_ids, targets, domain) of one domain."""
    if not batches:
        raise ConfigError("importance: no calibration batches")
    cfg = model.config
    was = model.training
    model.eval()  # no router jitter; the scores describe the model as it is evaluated
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    rec = _Recorder(model)
    heads_abs = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    kv_abs = torch.zeros(cfg.n_layers, cfg.n_kv_heads, dtype=torch.float64)
    ffn_abs = None
    try:
        for b in tqdm(batches, desc=desc, leave=False, disable=not progress, file=sys.stderr):
            loss = _loss(model, b, _hint(model, b, domain_names))
            loss.backward()
            g = weight_mask_gradients(model)
            heads_abs += g["heads"].abs()
            kv_abs += kv_groups(g["heads"], cfg.n_kv_heads).abs()
            ffn_abs = g["ffn"].abs() if ffn_abs is None else ffn_abs + g["ffn"].abs()
            for p in params:
                p.grad = None
    finally:
        rec.remove()
        for p, r in zip(params, req):
            p.requires_grad_(r)
        model.train(was)
    n = len(batches)
    out = rec.results(n)
    from moe.surgery.influence import block_influence

    hints = [{"input_ids": b["input_ids"], "domain": _hint(model, b, domain_names)}
             for b in batches]  # fmt: skip
    out["layers.influence"] = torch.tensor(block_influence(model, hints), dtype=torch.float64)
    out["heads.taylor"] = heads_abs / n
    out["kv.taylor"] = kv_abs / n
    out["kv.magnitude"] = kv_groups(out["heads.magnitude"], cfg.n_kv_heads)
    out["ffn.taylor"] = ffn_abs / n
    return {k: out[k] for k in SCORE_NAMES}


# ----------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def masked(model: Transformer, head_mask: torch.Tensor | None = None,
           ffn_mask: torch.Tensor | None = None, layer_mask: torch.Tensor | None = None):
    """Run `model` with head outputs (L, H), FFN neurons (L, F) or (L, E, Fe) and whole blocks
    (L,) scaled by masks (a 0 removes the unit, a block at 0 passes its input through). The masks
    may require grad (the reference mask gradients)."""
    handles = []
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    cfg = model.config
    H, Dh = cfg.n_heads, cfg.head_size()
    try:
        for i, lay in enumerate(model.layers):
            if head_mask is not None:
                def pre(mod, args, i=i):
                    y = args[0]  # (B, L, H * Dh)
                    B, L = y.shape[:2]
                    m = head_mask[i].to(y.dtype).view(1, 1, H, 1)
                    return ((y.view(B, L, H, Dh) * m).view(B, L, H * Dh),)

                handles.append(lay.attn.wo.register_forward_pre_hook(pre))
            if ffn_mask is not None and _moe(model):
                # the kernels take the weights whole: scale the rows of w2 instead (same function)
                w2 = lay.ffn.w2
                saved.append((w2, w2.data.clone()))
                with torch.no_grad():
                    w2.mul_(ffn_mask[i].to(w2.dtype).unsqueeze(-1))  # (E, Fe, C) * (E, Fe, 1)
            elif ffn_mask is not None:
                def pre_ffn(mod, args, i=i):
                    return (args[0] * ffn_mask[i].to(args[0].dtype),)  # (B, L, F)

                handles.append(lay.ffn.w2.register_forward_pre_hook(pre_ffn))
            if layer_mask is not None and float(layer_mask[i]) == 0.0:
                handles.append(lay.register_forward_hook(lambda mod, args, out: args[0]))
        yield model
    finally:
        for h in handles:
            h.remove()
        for p, data in saved:
            p.data.copy_(data)


def mask_gradients_by_hooks(model: Transformer, batch: dict) -> dict[str, torch.Tensor]:
    """dL/dm for heads (L, H) and dense FFN neurons (L, F) with explicit masks at 1 (slow
    reference for `weight_mask_gradients`)."""
    cfg = model.config
    hm = torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.float64, requires_grad=True)
    fm = torch.ones(cfg.n_layers, cfg.ffn_dim, dtype=torch.float64, requires_grad=True)
    with masked(model, hm, fm):
        loss = _loss(model, batch, None)
    gh, gf = torch.autograd.grad(loss, [hm, fm])
    return {"heads": gh, "ffn": gf}


# ----------------------------------------------------------------------------- files


def combine(scores: dict[str, dict[str, torch.Tensor]], by: str) -> dict[str, torch.Tensor]:
    """One domain's scores, or `all`: the mean over the domains of each score normalised by its
    own mean (so a domain with larger gradients overall does not dominate)."""
    if by != "all":
        if by not in scores:
            raise ConfigError(f"--by {by}: the scores hold domains {', '.join(scores)} only")
        return scores[by]
    out = {}
    for name in SCORE_NAMES:
        ts = [s[name] / s[name].mean().clamp(min=1e-30) if s[name].numel() else s[name]
              for s in scores.values()]  # fmt: skip
        out[name] = torch.stack(ts).mean(0)
    return out


def checkpoint_hash(ckpt_dir: Path) -> str:
    from moe.io.checkpoint import WEIGHTS, read_meta

    return (read_meta(ckpt_dir).get("sha256") or {}).get(WEIGHTS, "")


def save_scores(path: Path, scores: dict[str, dict[str, torch.Tensor]], info: dict) -> Path:
    """`path` (.safetensors) holding DOMAIN/NAME tensors, and its JSON summary beside it; both
    written through temporary names."""
    tensors = {f"{d}/{n}": t.contiguous() for d, s in scores.items() for n, t in s.items()}
    from moe.io.checkpoint import staged_file, write_json

    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})

    write_json(summary_path(path), summarise(scores, info))
    return path


def summary_path(path: Path) -> Path:
    return path.with_suffix(".json")


def load_scores(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({domain: {name: tensor}}, info) from a scores file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scores file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a scores file ({str(e).splitlines()[0]})") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        d, _, n = k.partition("/")
        out.setdefault(d, {})[n] = t
    if not out or any(set(s) != set(SCORE_NAMES) for s in out.values()):
        raise ConfigError(f"{path}: not a complete scores file (written by moe importance)")
    return out, info


def top_fraction_mass(t: torch.Tensor, frac: float = 0.2) -> float:
    """Share of the total score held by the top `frac` of units (how concentrated it is)."""
    v = t.flatten().double().sort(descending=True).values
    k = max(1, int(round(frac * v.numel())))
    total = float(v.sum())
    return float(v[:k].sum()) / total if total > 0 else float("nan")


def kept_sets(s: torch.Tensor, keep_frac: float) -> list[set[int]]:
    """Per layer (and expert), the indices of the top `keep_frac` of units by score."""
    rows = s.reshape(-1, s.shape[-1])
    k = max(1, int(round(keep_frac * rows.shape[-1])))
    return [set(torch.argsort(r, descending=True, stable=True)[:k].tolist()) for r in rows]


def jaccard(a: list[set[int]], b: list[set[int]]) -> float:
    """Mean over layers of |A ∩ B| / |A ∪ B|."""
    vals = [len(x & y) / len(x | y) for x, y in zip(a, b) if x | y]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(scores: dict[str, dict[str, torch.Tensor]], info: dict) -> dict:
    doms = list(scores)
    per = {}
    for d, s in scores.items():
        per[d] = {
            "layers.influence": [round(float(x), 6) for x in s["layers.influence"]],
            "kv.taylor": [[round(float(x), 6) for x in row] for row in s["kv.taylor"]],
            "top20_mass": {n: top_fraction_mass(s[n]) for n in SCORE_NAMES if s[n].numel()},
        }
    overlap: dict[str, dict] = {}
    for name in ("ffn.taylor", "ffn.magnitude", "heads.taylor"):
        for keep in (0.5,):
            key = f"{name}@keep{keep}"
            overlap[key] = {f"{a}|{b}": jaccard(kept_sets(scores[a][name], keep),
                                                 kept_sets(scores[b][name], keep))
                            for i, a in enumerate(doms) for b in doms[i + 1:]}  # fmt: skip
    return {"info": info, "domains": per, "jaccard": overlap,
            "note": "jaccard: mean over layers of the overlap of the top half of units by score "
                    "(chance level for a random half: 1/3)"}  # fmt: skip


def calibration_batches(data: DataConfig, seed: int, domain: str, n: int, batch_size: int,
                        tokenizer) -> list[dict]:  # fmt: skip
    """`n` batches of `domain`'s training split; a one-line error if it has none."""
    from moe.surgery.experts import domain_batches

    if domain not in DOMAINS and domain not in data.sources:
        raise ConfigError(f"importance: unknown domain {domain!r}; built-in domains are "
                          f"{', '.join(DOMAINS)}")  # fmt: skip
    try:
        batches = domain_batches(data, seed, domain, n, batch_size, tokenizer=tokenizer)
    except (ValueError, IndexError, ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"importance: domain {domain!r} has no calibration data "
                          f"({str(e).splitlines()[0]})") from None  # fmt: skip
    if not batches:
        raise ConfigError(f"importance: domain {domain!r} has no calibration data (no training "
                          "sequences)")  # fmt: skip
    return batches


def importance_checkpoint(ckpt: str | os.PathLike, domains: list[str], out: str | os.PathLike,
                          batches: int = 8, batch_size: int = 8, overwrite: bool = False,
                          progress: bool = True) -> Path:  # fmt: skip
    """`moe importance`: every score for each domain into `out` (.safetensors) + its .json."""
    import dataclasses

    from moe.eval.evaluate import data_config_of
    from moe.io.checkpoint import load_model
    from moe.io.output import claim

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: give a .safetensors file name (the JSON summary is "
                          "written beside it)")  # fmt: skip
    if (out.exists() or summary_path(out).exists()) and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    if not domains:
        raise ConfigError("--domains: name at least one domain")
    if len(set(domains)) != len(domains) or "all" in domains:
        raise ConfigError("--domains: list each domain once ('all' is made from them at prune "
                          "time)")  # fmt: skip
    if batches < 1 or batch_size < 1:
        raise ConfigError("--batches and --batch-size must be at least 1")
    with claim([out, summary_path(out)], [ckpt]):  # moe/io/output.py
        model, meta, tok, ckpt_dir = load_model(ckpt, require_tokenizer=True,
                                                flag="data.tokenizer=PATH")  # fmt: skip
        data, seed = data_config_of(meta)
        seq_len = min(data.seq_len, model.config.max_seq_len)
        data = dataclasses.replace(data, seq_len=seq_len)
        calib = {d: calibration_batches(data, seed, d, batches, batch_size, tok) for d in domains}
        from moe.data.datamodule import domain_names

        names = domain_names(data)
        scores = {d: compute_importance(model, calib[d], names, progress, f"importance {d}")
                  for d in domains}  # fmt: skip
        info = {"checkpoint": str(ckpt_dir), "checkpoint_id": meta.get("id"),
                "checkpoint_sha256": checkpoint_hash(ckpt_dir), "domains": list(domains),
                "batches": batches, "batch_size": batch_size, "seq_len": data.seq_len,
                "split": "train",
                "shapes": {n: list(t.shape) for n, t in scores[domains[0]].items()}}
        return save_scores(out, scores, info)


def check_scores_for(info: dict, ckpt_dir: Path, path: str | os.PathLike) -> None:
    """Scores must have been computed on this very checkpoint (its weights' sha256)."""
    want = checkpoint_hash(ckpt_dir)
    got = info.get("checkpoint_sha256")
    if not got or got != want:
        raise ConfigError(
            f"{path}: the scores were computed for another checkpoint (weights sha256 "
            f"{(got or 'none')[:12]}..., this one {want[:12]}...); run moe importance on it"
        )
