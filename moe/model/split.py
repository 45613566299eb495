"""Dense ⇄ experts: split a dense model into an MoE, extract one expert's branch, assemble branches.

Split methods, registered by name in `SPLITS` (each keeps the attention, embeddings and norms of
the dense model; each is one function below, from one layer's FFN to its experts' neurons):
    copy        every expert is a copy of the dense FFN (sparse upcycling, Komatsuzaki et al. 2022;
                Branch-Train-Mix, Sukhbaatar et al. 2024). With normalised top-k weights the MoE
                computes exactly the dense function.
    random      the FFN's hidden neurons are partitioned into E equal groups at random
                (LLaMA-MoE, Zhu et al. 2024, "random split").
    kmeans      neurons are clustered by their gate vectors with balanced k-means (LLaMA-MoE's
                clustering split).
    activation  neurons go to the domain whose data activates them most; optionally the neurons
                every domain needs (high importance on all domains) form an always-on shared expert.
With every expert active and weights 1, a partition split (random/kmeans/activation) computes
exactly the dense function: SwiGLU is a sum over hidden neurons. When F is not divisible by E the
groups are padded with zero neurons, which contribute nothing.

A branch is a dense model: the shared weights plus one expert's FFN (with the shared expert's
neurons, when there is one, concatenated in front: SwiGLU over the union of neurons equals the sum
of the two FFNs). Assembly inverts this: FFNs become experts, the other weights are averaged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe.config import ConfigError, MoEConfig
from moe.config.registry import Registry
from moe.model.transformer import SwiGLU, Transformer


def default_top_k(num_experts: int) -> int:
    """Two experts per token (Mixtral, BTX): with renormalised weights a single expert would
    always get weight 1, and the router would receive no gradient from the loss."""
    return min(2, num_experts)


def _moe_config(
    experts: list[str], fe: int, router: str, top_k: int, shared: int, backend: str
) -> MoEConfig:
    return MoEConfig(
        experts=list(experts),
        expert_ffn_dim=fe,
        router=router,
        top_k=top_k if router == "learned" else 1,  # hard routing picks exactly one expert
        shared_expert_ffn_dim=shared,
        backend=backend,
    )


def _dense_ffns(model: Transformer) -> list[SwiGLU]:
    if model.config.moe.experts:
        raise ConfigError("split needs a dense checkpoint; this one is already an MoE")
    return [layer.ffn for layer in model.layers]


def _copy_shared(src: Transformer, dst: Transformer) -> None:
    """Copy every non-FFN tensor (embeddings, attention, norms, head) from src to dst."""
    sd = {k: v for k, v in src.state_dict().items() if ".ffn." not in k}
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(".ffn." in k for k in missing), missing


def _balanced_assign(score_NG: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of N items to one of G groups maximising score, at most `capacity` per group.

    Greedy over (item, group) pairs in descending score order; deterministic (stable sort).
    """
    N, G = score_NG.shape
    order = torch.argsort(score_NG.reshape(-1), descending=True, stable=True)
    group = torch.full((N,), -1, dtype=torch.long)
    load = [0] * G
    left = N
    for flat in order.tolist():
        i, g = divmod(flat, G)
        if group[i] >= 0 or load[g] >= capacity:
            continue
        group[i] = g
        load[g] += 1
        left -= 1
        if left == 0:
            break
    return group


def _groups_from_assignment(assign_F: torch.Tensor, E: int) -> list[torch.Tensor]:
    return [torch.nonzero(assign_F == e).flatten() for e in range(E)]


def _kmeans_groups(w1_FD: torch.Tensor, E: int, seed: int, iters: int = 25) -> list[torch.Tensor]:
    x = F.normalize(w1_FD.double(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(x.shape[0], generator=g)[:E]].clone()
    for _ in range(iters):
        assign = (x @ centers.T).argmax(-1)
        for e in range(E):
            members = x[assign == e]
            if len(members):
                centers[e] = F.normalize(members.mean(0), dim=0)
    cap = math.ceil(x.shape[0] / E)
    return _groups_from_assignment(_balanced_assign(x @ centers.T, cap), E)


def _run_with_ffn_inputs(model: Transformer, ffns: list, add, batches: list[dict]) -> int:
    """Run `batches` through `model` (no grad, eval mode), calling `add(layer, ffn, ffn_input)`
    at every FFN; returns the number of tokens seen."""
    hooks = [
        ffn.register_forward_hook(lambda mod, inp, _out, li=li: add(li, mod, inp[0]))
        for li, ffn in enumerate(ffns)
    ]
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(b["input_ids"])
                count += b["input_ids"].numel()
    finally:
        for h in hooks:
            h.remove()
    return count


def neuron_importance(
    model: Transformer, batches_by_domain: dict[str, list[dict]]
) -> dict[str, list[torch.Tensor]]:
    """Mean |activation| of each FFN hidden neuron, per domain and layer: {domain: [(F,) ...]}."""
    ffns = _dense_ffns(model)
    out: dict[str, list[torch.Tensor]] = {}
    for dom, batches in batches_by_domain.items():
        sums = [torch.zeros(f.w1.out_features, dtype=torch.float64) for f in ffns]

        def add(li: int, mod, x: torch.Tensor, sums=sums) -> None:
            h = F.silu(mod.w1(x)) * mod.w3(x)  # (B, L, F) hidden activations
            sums[li] += h.abs().double().sum(dim=(0, 1)).cpu()

        count = _run_with_ffn_inputs(model, ffns, add, batches)
        if count == 0:
            raise ConfigError(f"activation split: no data for domain {dom!r}")
        out[dom] = [s / count for s in sums]
    return out


def _activation_groups(
    imp_DF: torch.Tensor, shared_dim: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(shared neuron ids, per-domain neuron ids) from importance (domains, F)."""
    D, Fh = imp_DF.shape
    # importance relative to each domain's mean, so a domain with larger activations overall
    # does not take every neuron
    rel = imp_DF / imp_DF.mean(dim=1, keepdim=True).clamp(min=1e-12)
    if shared_dim:
        # the neurons every domain needs: highest minimum relative importance over domains
        shared = torch.argsort(rel.min(0).values, descending=True, stable=True)[:shared_dim]
        shared = shared.sort().values
    else:
        shared = torch.zeros(0, dtype=torch.long)
    rest = torch.ones(Fh, dtype=torch.bool)
    rest[shared] = False
    rest_ids = torch.nonzero(rest).flatten()
    cap = math.ceil(len(rest_ids) / D)
    assign = _balanced_assign(rel[:, rest_ids].T, cap)
    return shared, [rest_ids[g].sort().values for g in _groups_from_assignment(assign, D)]


@dataclasses.dataclass(frozen=True)
class SplitLayer:
    """What a split method sees of one layer's dense FFN."""

    index: int  # the layer
    w1: torch.Tensor  # (F, D) gate projection: each hidden neuron's input weights
    experts: list[str]
    expert_dim: int  # neurons per expert
    shared_dim: int  # neurons of the always-on shared expert (0: none)
    seed: int
    gen: torch.Generator  # one stream across the layers
    importance: dict[str, list[torch.Tensor]] | None  # {domain: [(F,) per layer]}


# (shared neuron ids, each expert's neuron ids), both (n,) long tensors
Groups = tuple[torch.Tensor, list[torch.Tensor]]
SplitFn = Callable[[SplitLayer], Groups]


@dataclasses.dataclass(frozen=True)
class SplitMethod:
    groups: SplitFn
    partition: bool = True  # the experts partition the neurons (else each is the whole FFN)
    shared: bool = False  # --shared-dim: neurons every expert needs form a shared expert
    needs_data: bool = False  # scores neurons on each expert's domain data (`importance`)


SPLITS: Registry[SplitMethod] = Registry("split method", order="registered")


def split_method(name: str, *, partition: bool = True, shared: bool = False,
                 needs_data: bool = False) -> Callable[[SplitFn], SplitFn]:  # fmt: skip
    def deco(fn: SplitFn) -> SplitFn:
        SPLITS.register(name, SplitMethod(fn, partition, shared, needs_data))
        return fn

    return deco


def _no_shared() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@split_method("copy", partition=False)
def _copy_split(x: SplitLayer) -> Groups:
    return _no_shared(), [torch.arange(x.w1.shape[0])] * len(x.experts)


@split_method("random")
def _random_split(x: SplitLayer) -> Groups:
    perm, fe = torch.randperm(x.w1.shape[0], generator=x.gen), x.expert_dim
    return _no_shared(), [perm[e * fe : (e + 1) * fe].sort().values for e in range(len(x.experts))]


@split_method("kmeans")
def _kmeans_split(x: SplitLayer) -> Groups:
    return _no_shared(), _kmeans_groups(x.w1, len(x.experts), x.seed + x.index)


@split_method("activation", shared=True, needs_data=True)
def _activation_split(x: SplitLayer) -> Groups:
    if x.importance is None:
        raise ConfigError("activation split needs domain data (importance) to score neurons")
    missing = [e for e in x.experts if e not in x.importance]
    if missing:
        raise ConfigError(f"activation split: no data for expert domain(s) {missing}")
    imp = torch.stack([x.importance[e][x.index] for e in x.experts])  # (E, F)
    return _activation_groups(imp, x.shared_dim)


SPLIT_METHODS = tuple(SPLITS.names())  # the built-in ones, in registration order


def split_model(
    dense: Transformer,
    experts: list[str],
    method: str = "copy",
    *,
    router: str = "learned",
    top_k: int | None = None,
    shared_dim: int = 0,
    seed: int = 0,
    importance: dict[str, list[torch.Tensor]] | None = None,
    backend: str = "auto",
) -> tuple[Transformer, dict]:
    """Turn a dense model into an MoE with experts named `experts`. Returns (model, split info)."""
    spec = SPLITS[method]
    E = len(experts)
    if E < 1 or len(set(experts)) != E:
        raise ConfigError("split needs one or more distinct expert names")
    top_k = default_top_k(E) if top_k is None else top_k
    if not 1 <= top_k <= E:
        raise ConfigError(f"--top-k {top_k} must be between 1 and the number of experts ({E})")
    ffns = _dense_ffns(dense)
    cfg = dense.config
    Fh = cfg.ffn_dim
    if shared_dim and not spec.shared:
        with_shared = ", ".join(n for n, m in SPLITS.items() if m.shared)
        raise ConfigError(f"--shared-dim applies to the {with_shared} split only")
    if not 0 <= shared_dim < Fh:
        raise ConfigError(f"--shared-dim must be in [0, {Fh}) for this model (ffn_dim={Fh})")
    fe = math.ceil((Fh - shared_dim) / E) if spec.partition else Fh
    moe_cfg = _moe_config(experts, fe, router, top_k, shared_dim, backend)
    new_cfg = dataclasses.replace(cfg, moe=moe_cfg)
    torch.manual_seed(seed)
    moe = Transformer(new_cfg)
    _copy_shared(dense, moe)
    info: dict = {
        "method": method,
        "experts": list(experts),
        "expert_ffn_dim": fe,
        "shared_dim": shared_dim,
        "groups": [],
    }
    g = torch.Generator().manual_seed(seed)
    for li, (ffn, layer) in enumerate(zip(ffns, moe.layers)):
        w1, w3, w2 = ffn.w1.weight.data, ffn.w3.weight.data, ffn.w2.weight.data  # (F,D),(F,D),(D,F)
        layer_in = SplitLayer(li, w1, list(experts), fe, shared_dim, seed, g, importance)
        shared, groups = spec.groups(layer_in)
        ffn_moe = layer.ffn
        ffn_moe.w1.data.zero_()
        ffn_moe.w3.data.zero_()
        ffn_moe.w2.data.zero_()
        for e, idx in enumerate(groups):
            n = len(idx)  # < fe only for the zero-padded last groups
            ffn_moe.w1.data[e, :, :n] = w1[idx].T
            ffn_moe.w3.data[e, :, :n] = w3[idx].T
            ffn_moe.w2.data[e, :n, :] = w2[:, idx].T
        if shared_dim:
            ffn_moe.shared.w1.weight.data.copy_(w1[shared])
            ffn_moe.shared.w3.weight.data.copy_(w3[shared])
            ffn_moe.shared.w2.weight.data.copy_(w2[:, shared])
        info["groups"].append([len(idx) for idx in groups])
    return moe, info


def extract_branch(moe: Transformer, expert: str) -> Transformer:
    """Dense model: shared weights + expert `expert`'s FFN (shared expert neurons first)."""
    cfg = moe.config
    if expert not in cfg.moe.experts:
        raise ConfigError(
            f"branch.domain={expert!r} is not an expert of this model "
            f"(experts: {', '.join(cfg.moe.experts)})"
        )
    e = cfg.moe.experts.index(expert)
    fe, fs = cfg.moe.expert_ffn_dim or cfg.ffn_dim, cfg.moe.shared_expert_ffn_dim
    dense_cfg = dataclasses.replace(cfg, ffn_dim=fs + fe, moe=MoEConfig())
    dense = Transformer(dense_cfg)
    _copy_shared(moe, dense)
    for src, dst in zip(moe.layers, dense.layers):
        m, d = src.ffn, dst.ffn
        parts1, parts3, parts2 = [m.w1.data[e].T], [m.w3.data[e].T], [m.w2.data[e]]
        if fs:
            parts1.insert(0, m.shared.w1.weight.data)
            parts3.insert(0, m.shared.w3.weight.data)
            parts2.insert(0, m.shared.w2.weight.data.T)
        d.w1.weight.data.copy_(torch.cat(parts1, 0))  # (Fs+Fe, D)
        d.w3.weight.data.copy_(torch.cat(parts3, 0))
        d.w2.weight.data.copy_(torch.cat(parts2, 0).T)  # (D, Fs+Fe)
    dense.shared_ffn_dim = fs  # recorded in the branch's meta so assembly can split it back
    return dense


def assemble(
    branches: list[Transformer],
    experts: list[str],
    *,
    shared_ffn_dim: int = 0,
    base: Transformer | None = None,
    router: str = "learned",
    top_k: int | None = None,
    router_init: torch.Tensor | None = None,
    seed: int = 0,
    backend: str = "auto",
) -> Transformer:
    """Branch-Train-Mix: branch FFNs become experts; other weights averaged (or taken from `base`).

    `shared_ffn_dim` > 0: the first Fs neurons of every branch FFN are the shared expert's, averaged
    across branches. `router_init` (layers, E, D) sets the router rows (else random init).
    """
    if len(branches) != len(experts) or not branches:
        raise ConfigError("assemble needs one branch per expert name")
    top_k = default_top_k(len(experts)) if top_k is None else top_k
    if router == "learned" and not 1 <= top_k <= len(experts):
        raise ConfigError(
            f"--top-k {top_k} must be between 1 and the number of experts ({len(experts)})"
        )
    cfg0 = branches[0].config
    for b, name in zip(branches, experts):
        if b.config.moe.experts:
            raise ConfigError(f"branch {name!r} is an MoE; assemble takes dense branches")
        for f in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "vocab_size",
            "tie_embeddings",
        ):
            if getattr(b.config, f) != getattr(cfg0, f):
                raise ConfigError(
                    f"branch {name!r} differs in {f} ({getattr(b.config, f)} vs {getattr(cfg0, f)})"
                )
    fs = shared_ffn_dim
    fe = cfg0.ffn_dim - fs
    if fe <= 0:
        raise ConfigError(f"shared_ffn_dim {fs} leaves no expert neurons (ffn_dim {cfg0.ffn_dim})")
    moe_cfg = _moe_config(experts, fe, router, top_k, fs, backend)
    torch.manual_seed(seed)
    moe = Transformer(dataclasses.replace(cfg0, moe=moe_cfg))
    if base is not None:
        _copy_shared(base, moe)
    else:
        sds = [b.state_dict() for b in branches]
        avg = {
            k: torch.stack([sd[k].double() for sd in sds]).mean(0).to(sds[0][k].dtype)
            for k in sds[0]
            if ".ffn." not in k
        }
        moe.load_state_dict(avg, strict=False)
    for li, layer in enumerate(moe.layers):
        m = layer.ffn
        for e, b in enumerate(branches):
            d = b.layers[li].ffn
            m.w1.data[e] = d.w1.weight.data[fs:].T
            m.w3.data[e] = d.w3.weight.data[fs:].T
            m.w2.data[e] = d.w2.weight.data[:, fs:].T
        if fs:
            for name in ("w1", "w3", "w2"):
                parts = [getattr(b.layers[li].ffn, name).weight.data for b in branches]
                parts = [p[:fs] if name != "w2" else p[:, :fs] for p in parts]
                getattr(m.shared, name).weight.data.copy_(
                    torch.stack([p.double() for p in parts]).mean(0).to(parts[0].dtype)
                )
        if router_init is not None and m.router is not None:
            m.router.weight.data.copy_(router_init[li])
    return moe


def domain_mean_router(
    branches: list[Transformer], batches_by_expert: list[list[dict]], scale: float = 1.0
) -> torch.Tensor:
    """Router rows from each branch's mean FFN input on its own domain: (layers, E, D).

    Each row is the unit-normalised mean of the normalised hidden state entering the FFN, times
    `scale`: a token resembling domain e's average scores highest on expert e.
    """
    rows = []
    for b, batches in zip(branches, batches_by_expert):
        sums = [torch.zeros(b.config.dim, dtype=torch.float64) for _ in b.layers]

        def add(li: int, _mod, x: torch.Tensor, sums=sums) -> None:
            sums[li] += x.double().sum(dim=(0, 1)).cpu()

        count = _run_with_ffn_inputs(b, [layer.ffn for layer in b.layers], add, batches)
        if count == 0:
            raise ConfigError("router init from domain means: a branch has no data")
        # one row per layer: (layers, D)
        rows.append(torch.stack([F.normalize(s / count, dim=0) * scale for s in sums]))
    return torch.stack(rows, dim=1).float()  # (layers, E, D)
