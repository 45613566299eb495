"""Qwen2-MoE import (Qwen2MoeForCausalLM, model_type "qwen2_moe"): the inverse of the mapping in
moe/io/hf_export.py's docstring. moe/io/hf.py calls it for the config and the weights.

Every layer must be sparse (decoder_sparse_step 1, no mlp_only_layers, num_experts > 0): our MoE
has no dense FFN layers, so Qwen2-MoE's `intermediate_size` MLP is never used. Qwen2-MoE's router
is softmax → top-k (→ renormalised with norm_topk_prob), ours with normalize_weights. Experts are
read in the per-expert layout (mlp.experts.{j}.{gate,up,down}_proj.weight, what save_pretrained
writes in transformers 4 and 5) or in transformers 5's in-memory fused layout
(mlp.experts.gate_up_proj (E, 2F, D), mlp.experts.down_proj (E, D, F); a de-quantized GGUF).
A foreign Qwen2-MoE always gates its shared expert (moe.shared_expert_gate: true). Our own export
records moe_forge_shared_expert_gate and moe_forge_qkv_bias: an ungated shared expert was written
with gate 0 and its down projection doubled, a model without q/k/v biases with zero biases; both
are undone exactly (halving undoes doubling bit for bit), so export → import round-trips.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, MoEConfig
from moe.io.hf import our_name

_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)$")
_EXPERT = re.compile(r"experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED = re.compile(r"shared_expert\.(gate|up|down)_proj\.weight$")
_OURS = {"gate": "w1", "up": "w3", "down": "w2"}


def _need(hf: dict[str, Any], key: str, where: Path) -> int:
    if hf.get(key) is None:
        raise ConfigError(f"{where}: {key} is missing (a Qwen2-MoE config needs it)")
    return int(hf[key])


def qwen2_moe_config(hf: dict[str, Any], where: Path) -> tuple[MoEConfig, bool]:
    """(our MoEConfig, qkv_bias) for a Qwen2-MoE config.json; refuses, in one line naming the
    field, a layout with dense FFN layers (which our MoE cannot hold)."""
    step = int(hf.get("decoder_sparse_step", 1))
    if step != 1:
        raise ConfigError(f"{where}: decoder_sparse_step {step} is not supported (1 only: every "
                          "layer an MoE; our model has no dense FFN layers between them)")
    dense = list(hf.get("mlp_only_layers") or [])
    if dense:
        raise ConfigError(f"{where}: mlp_only_layers {dense} is not supported (empty only: our "
                          "MoE has no dense FFN layers)")
    n = _need(hf, "num_experts", where)
    if n < 1:
        raise ConfigError(f"{where}: num_experts {n} is not supported (a model with no experts "
                          "is dense: import it as Qwen2)")
    shared = _need(hf, "shared_expert_intermediate_size", where)
    if shared < 1:
        raise ConfigError(f"{where}: shared_expert_intermediate_size {shared} is not supported "
                          "(at least 1)")
    names = hf.get("moe_forge_experts") or [f"expert{e}" for e in range(n)]
    moe = MoEConfig(
        experts=list(names),
        expert_ffn_dim=_need(hf, "moe_intermediate_size", where),
        router="learned",
        top_k=int(hf.get("num_experts_per_tok", 4)),  # transformers' defaults where absent
        shared_expert_ffn_dim=shared,
        shared_expert_gate=hf.get("moe_forge_shared_expert_gate") is not False,
        normalize_weights=bool(hf.get("norm_topk_prob", False)),
        load_balance_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )
    # transformers 4 always has q/k/v biases; our export writes zeros and says so
    qkv = hf.get("moe_forge_qkv_bias", hf.get("qkv_bias", True))
    return moe, bool(qkv)


def qwen2_moe_state(
    hf: dict[str, Any], moe: MoEConfig, qkv_bias: bool, tensors: dict[str, torch.Tensor],
    where: Path,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A Qwen2-MoE state dict (HF names) under our names; shapes are checked by the caller."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (layer, w) -> {e: (in, out)}
    gates: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor, hname: str) -> None:
        if name in state:
            raise ConfigError(f"{where}: {hname} gives {name} (our name) a second time")
        state[name] = t

    for hname, t in tensors.items():
        m = _MLP.match(hname)
        if m is None:
            name = our_name(hname)
            if name is not None:
                put(name, t, hname)
            continue
        i, rest = m.groups()
        pre = f"layers.{i}.ffn"
        if rest == "gate.weight":
            put(f"{pre}.router.weight", t, hname)
        elif e := _EXPERT.match(rest):
            # nn.Linear layout (out, in) → kernel layout (in, out)
            experts.setdefault((i, _OURS[e.group(2)]), {})[int(e.group(1))] = t.T.contiguous()
        elif rest == "experts.gate_up_proj":  # (E, 2F, D): gate rows, then up rows
            w1, w3 = t.chunk(2, dim=1)
            put(f"{pre}.w1", w1.transpose(1, 2).contiguous(), hname)
            put(f"{pre}.w3", w3.transpose(1, 2).contiguous(), hname)
        elif rest == "experts.down_proj":  # (E, D, F)
            put(f"{pre}.w2", t.transpose(1, 2).contiguous(), hname)
        elif s := _SHARED.match(rest):
            put(f"{pre}.shared.{_OURS[s.group(1)]}.weight", t, hname)
        elif rest == "shared_expert_gate.weight":
            gates[i] = t
        else:
            raise ConfigError(f"{where}: tensor {hname} is not part of a Qwen2-MoE model this "
                              "tool can import (dense FFN layers are not supported)")
    E = len(moe.experts)
    for (layer, w), by_e in experts.items():
        if sorted(by_e) != list(range(E)):
            raise ConfigError(
                f"{where}: layer {layer} {w} has experts {sorted(by_e)}, expected {E}"
            )
        put(f"layers.{layer}.ffn.{w}", torch.stack([by_e[e] for e in range(E)]),
            f"model.layers.{layer}.mlp.experts.*")
    if moe.shared_expert_gate:
        for i, g in gates.items():
            put(f"layers.{i}.ffn.shared_gate.weight", g, f"model.layers.{i}.mlp.shared_expert_gate")
    else:  # our ungated export: gate 0, down projection doubled for sigmoid(0) = 1/2
        for w2 in [k for k in state if k.endswith(".ffn.shared.w2.weight")]:
            g = gates.get(i := w2.split(".")[1])
            if g is None or g.any():
                raise ConfigError(f"{where}: moe_forge_shared_expert_gate is false but layer "
                                  f"{i}'s shared_expert_gate is missing or not zero")
            state[w2] = state[w2] / 2  # halving undoes the doubling exactly
    if not qkv_bias:  # our export's zero biases for a model without them
        for name in [k for k in state if k.endswith((".wq.bias", ".wk.bias", ".wv.bias"))]:
            if state.pop(name).any():
                raise ConfigError(f"{where}: moe_forge_qkv_bias is false but {name} (our name) "
                                  "is not zero (changed after export?)")
    return state


__all__ = ["qwen2_moe_config", "qwen2_moe_state"]
