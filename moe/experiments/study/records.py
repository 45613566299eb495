"""Typed records of a study, shared by the runner and the report (saved as results.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageRecord:
    """What one stage trained or built (the compute ledger's rows)."""

    name: str
    kind: str
    steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    tokens_by_domain: dict[str, int] = field(default_factory=dict)
    active_params: int = 0
    total_params: int = 0
    checkpoint: str = ""


@dataclass
class ModelResult:
    """One evaluated model: its compute (over its lineage) and per-domain held-out results."""

    name: str
    arm: str  # the role: seed | branch | finetune | merge | moe | monolith | ensemble | average
    label: str  # the arm label in the answer table ("" if none)
    lineage: list[str]
    train_flops: float
    tokens: int
    tokens_by_domain: dict[str, int]
    epochs_by_domain: dict[str, float]  # in-domain tokens / that domain's training tokens
    active_params: int
    total_params: int
    eval: dict[str, dict[str, float]]  # domain -> {loss, bpb, tokens, bytes, ...}
    checkpoint: str | None = None
    routing: Any = None
    domain: str | None = None
    family: str | None = None
    eval_sets: dict[str, dict[str, float]] = field(default_factory=dict)  # study.eval_data


@dataclass
class StudyResult:
    name: str
    seed: int
    created: str
    wall_s: float
    device: str
    protocol: str
    domains: list[str]
    experts: list[str]
    split_method: str
    arms_run: list[str]
    budget: dict[str, Any]
    train_tokens_by_domain: dict[str, int]
    stages: list[StageRecord]
    models: dict[str, ModelResult]
    arms: dict[str, str]  # answer-table label -> model name, in report order
    reference_arm: str
    curves: dict[str, list[dict]]
    merge: dict | None = None
    command: str = ""
    samples: str | None = None  # markdown: greedy continuations per domain (./samples.py)
    eval_sets: list[str] = field(default_factory=list)  # study.eval_data's domains
    eval_protocol: dict | None = None  # how the models were scored (moe.eval.evaluate)
    eval_data: list[str] = field(default_factory=list)  # its specs, as given
    # the multi-seed report's tests (study.equivalence_margin, study.bootstrap_iters)
    equivalence_margin: float = 0.01
    bootstrap_iters: int = 2000

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StudyResult:
        d = dict(d)
        d["stages"] = [StageRecord(**s) for s in d.get("stages", [])]
        d["models"] = {k: ModelResult(**m) for k, m in d.get("models", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
