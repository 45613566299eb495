"""The recipe sections of the experiments `moe run` runs besides the study (moe/experiments/):
`init_study:`, `fleet:`, `surgery:`, `prune:`. Each is a plain dataclass, part of `Recipe`
(moe/config/ re-exports them); an empty section (no arms, no kind) switches nothing on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InitStudyConfig:
    """`moe run` of an init-from-distribution experiment (moe/experiments/init/study.py, issue 15):
    a source model trained on the train split, then one target per arm x warm-up x seed.
    Empty `arms` = not an init study."""

    arms: list[str] = field(default_factory=list)  # METHOD[+norms][+emb], e.g. histogram+emb
    source_steps: int = 1000  # the source model's training steps (train split)
    steps: int = 300  # each target's training steps
    warmup: list[int] = field(default_factory=lambda: [100, 0])  # warm-up steps: on / off
    eval_every: int = 25  # held-out evaluation interval (steps), step 0 included
    eval_batches: int = 4  # held-out batches per domain at each evaluation
    diagnostics_at: list[int] = field(default_factory=lambda: [0, 50, 300])  # steps
    thresholds_at: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.9])  # of steps
    seeds: int = 3
    # the targets' peak LR (None: optim.lr, the source's); a higher one asks whether a
    # distribution init trains stably where `standard` needs warm-up
    target_lr: float | None = None


@dataclass
class FleetConfig:
    """`moe run` of a fine-tune delta experiment (moe/experiments/fleet/study.py, issue 16).
    Unset `kind` = not one. Both kinds start from a base trained `base_steps` on the mixed stream.
    kind sizes: per domain x seed, a fine-tune of `steps`; its delta compressed by each of
    `methods`, applied, and evaluated on every domain against its exact size in bytes.
    kind fleet: each of `arms` (moe/experiments/fleet/fleet.py: `R=4 H=8 S=0 c=SPEC
    outer=average|nesterov fam=text[,dna] x=within|cross`, or `sync`) trains `steps` local
    steps per replica."""

    kind: str | None = None  # sizes | fleet
    base_steps: int = 1000  # the shared base model's training steps (mixed stream, train split)
    steps: int = 300  # sizes: each fine-tune's steps; fleet: each replica's local steps
    domains: list[str] = field(default_factory=list)  # sizes: fine-tuned domains; fleet: families
    methods: list[str] = field(default_factory=list)  # sizes: compression specs (topk:0.1+int8)
    arms: list[str] = field(default_factory=list)  # fleet: one arm per entry
    replicas: int = 4  # fleet: default R of an arm
    lr: float | None = None  # peak LR of fine-tunes / replicas (None: optim.lr)
    warmup_steps: int = 20  # their warm-up
    outer_lr: float = 0.7  # nesterov outer step (DiLoCo's values)
    outer_momentum: float = 0.9
    eval_every: int = 32  # fleet: held-out evaluation interval (local steps)
    eval_batches: int = 8  # held-out batches per domain at each evaluation
    checkpoint_every: int = 64  # fleet: local steps between saves of the whole fleet's state
    seeds: int = 2  # data orders (and DARE masks) of the fine-tunes / fleets


@dataclass
class SurgeryStudyConfig:
    """`moe run` of a grow/shrink/retokenize measurement (moe/experiments/surgery/study.py,
    issue 13). Unset `kind` = not one. The recipe's model section is the large / trained model.
    growth: a `small` model (the model section with these overrides) trains `small_steps`, is
      grown by each of `methods` (WIDTH+DEPTH: zero|split + identity|stack) to the model section
      and trained `steps`, against that model trained `steps` from scratch.
    depth_probe: a model trains `steps`; bpb per domain without each layer, and with it doubled.
    shrink: a model trains `steps`; bpb per domain with `fractions` of each of `axes` removed,
      before and after `heal_steps` of training.
    retokenize: a byte-level model trains `steps`; a BPE tokenizer of `vocab_size` is trained on
      the train split; each of `arms` trains `retok_steps` with the new tokenizer."""

    kind: str | None = None  # growth | depth_probe | shrink | retokenize
    steps: int = 1000
    seeds: int = 3
    eval_every: int = 50
    eval_batches: int = 4  # held-out batches per domain at each evaluation
    small: dict[str, int] = field(default_factory=dict)  # growth: the small model's overrides
    small_steps: int = 500  # growth
    methods: list[str] = field(default_factory=list)  # growth: zero+identity, split+stack, ...
    noise: float = 0.01  # growth: Net2Net share noise
    warmup_steps: int = 20  # warm-up of every continued training (grown, healed, retokenized)
    axes: list[str] = field(default_factory=list)  # shrink: layers | layers_bi | ffn | heads
    fractions: list[float] = field(default_factory=list)  # shrink
    heal_steps: int = 100  # shrink
    heal_lr: float | None = None  # shrink: peak LR of healing and its control (None: optim.lr)
    vocab_size: int = 512  # retokenize: the new BPE vocabulary
    arms: list[str] = field(default_factory=list)  # retokenize: mean_bytes[+frozen], ...
    retok_steps: int = 500  # retokenize


@dataclass
class PruneConfig:
    """Pruning (moe/experiments/prune/study.py, issue 14): `kind` runs a measurement with `moe run`
    (unset = not one); `trim_*` configure the study arm `trimmed`.
    curves: a model (the model section) trains `train_steps`; per-domain importance on the train
      split; bpb per domain with `fractions` of each of `units` removed by each of `methods`,
      scored by every domain and by all; healed (`heal_steps`) at `heal_fractions`; the 3x3
      matrix at `matrix_fraction` and the Jaccard overlap of the units each domain keeps.
    compress: each of `sizes` (DIMxLAYERSxHEADSxFFN) trains the FLOPs the largest spends in
      `budget_steps`; each is compressed at every one of `levels` (`+`-joined: headsF, ffnF,
      layersN, unstructuredF, int8, int4; fp16 = none); bpb against weight bytes (Pareto)."""

    kind: str | None = None  # curves | compress
    seeds: int = 3
    train_steps: int = 800  # curves: the pruned model's training steps (train split)
    units: list[str] = field(default_factory=lambda: ["heads", "ffn", "layers"])
    methods: list[str] = field(default_factory=lambda: ["taylor", "magnitude", "random"])
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    heal_steps: int = 0  # curves: healing steps at heal_fractions (0: none)
    heal_fractions: list[float] = field(default_factory=list)
    heal_lr: float = 1e-3
    matrix_fraction: float = 0.5  # curves: the 3x3 matrix and Jaccard at this fraction
    tolerance: float = 0.05  # bpb lost that counts as "removable"
    calib_batches: int = 8  # importance: training batches per domain
    eval_batches: int = 4  # held-out batches per domain
    sizes: list[str] = field(default_factory=list)  # compress: DIMxLAYERSxHEADSxFFN
    budget_steps: int = 200  # compress: the largest size's steps (sets the FLOPs budget)
    levels: list[str] = field(default_factory=list)  # compress
    # the study arm `trimmed`: each expert is the seed pruned by its domain's scores
    trim_ffn: float = 0.5  # fraction of FFN neurons each specialist drops
    trim_method: str = "taylor"  # taylor | magnitude | random
