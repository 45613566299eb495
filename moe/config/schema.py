"""The recipe schema: one dataclass per section (`Recipe` holds them), with the constants
their checks name. Loading and checking a recipe: moe/config/load.py."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from moe.config.check import (  # re-exported: moe.config.ConfigError, ...
    ConfigError,
)
from moe.config.experiments import (  # re-exported: moe.config.PruneConfig, ...
    FleetConfig,
    InitStudyConfig,
    PruneConfig,
    SurgeryStudyConfig,
)

DOMAINS = ("text", "code", "dna")


# ----------------------------------------------------------------------------- model

# Named sizes. Explicit fields in a recipe override the preset's values.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=384, max_seq_len=512),
    "small": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024, max_seq_len=1024),
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, max_seq_len=2048),
}


@dataclass
class MoEConfig:
    """Mixture-of-experts FFN. `experts` empty means a dense model."""

    experts: list[str] = field(default_factory=list)  # expert names, usually domains
    expert_ffn_dim: int | None = None  # hidden size of each expert; None = the model's ffn_dim
    router: str = "learned"  # learned (softmax top-k) | domain (hard, by the token's domain id)
    top_k: int = 2  # experts per token for the learned router
    shared_expert_ffn_dim: int = 0  # >0 adds an always-on shared expert of this hidden size
    # the shared expert's output times sigmoid(g . x), a learned (1, D) gate (Qwen2-MoE's)
    shared_expert_gate: bool = False
    normalize_weights: bool = True  # renormalise top-k weights to sum to 1
    load_balance_coef: float = 0.01  # Switch Transformer auxiliary loss weight
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    jitter: float = 0.0  # multiplicative jitter on router input during training
    backend: str = "auto"  # auto | triton | torch | loop (see moe_kernels.moe_mlp)
    # learned router options (moe/model/moe_layer.py; docs/architecture.md "Router options"):
    # scores s = softmax over the E logits | sigmoid of each logit (DeepSeek-V3); top-k picks the
    # highest s (+ the balancing bias), the weights are the chosen s, renormalised to sum 1 with
    # normalize_weights. Sigmoid scores (or a bias) select on the torch path, not Triton's.
    scoring: str = "softmax"
    # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias b, added to the scores for
    # the top-k choice only, updated after every optimizer step by b_e += rate * sign(mean load -
    # load_e) (a buffer: saved in the checkpoint, never trained). 0 = off
    bias_update_rate: float = 0.0
    # DeepSeek-V3's complementary sequence-wise balance loss: the Switch loss of each sequence
    # alone (its own loads and mean scores), averaged over the batch, times this. 0 = off
    seq_aux_coef: float = 0.0


SCORINGS = ("softmax", "sigmoid")  # model.moe.scoring


def check_router_options(m: MoEConfig) -> None:
    """One-line ConfigError for a learned-router option out of range (model.moe.scoring,
    bias_update_rate, seq_aux_coef, load_balance_coef, z_loss_coef), or set on a domain router,
    which scores nothing."""
    if m.scoring not in SCORINGS:
        raise ConfigError(f"model.moe.scoring: unknown scoring {m.scoring!r}; choose one of "
                          f"{', '.join(SCORINGS)}")
    for key in ("bias_update_rate", "seq_aux_coef", "load_balance_coef", "z_loss_coef"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.moe.{key} must be 0 (off) or more, got {getattr(m, key)}")
    if m.router == "domain":
        for key, off in (("scoring", "softmax"), ("bias_update_rate", 0.0), ("seq_aux_coef", 0.0)):
            if getattr(m, key) != off:
                raise ConfigError(f"model.moe.{key}={getattr(m, key)} applies to the learned "
                                  "router; router=domain sends each token to its domain's expert")


@dataclass
class RopeScalingConfig:
    """Llama 3's RoPE frequency scaling (transformers' rope_type "llama3"): wavelengths longer than
    original_max_len / low_freq_factor are divided by `factor`, those shorter than
    original_max_len / high_freq_factor are kept, and the band between is interpolated."""

    rope_type: str = "llama3"  # the only type this model computes
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192  # transformers' original_max_position_embeddings


@dataclass
class ModelConfig:
    """Llama-style decoder. `size` picks a preset; any field set here overrides it."""

    size: str = "debug"  # debug | tiny | small | base
    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD (the byte tokenizer)
    dim: int | None = None  # model width
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    # per-head size; None = dim // n_heads. Set when heads were pruned (moe prune keeps each
    # head's size, so n_heads * head_dim may be less than dim)
    head_dim: int | None = None
    ffn_dim: int | None = None  # SwiGLU hidden size
    max_seq_len: int | None = None  # longest context RoPE is prepared for
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None  # None = plain RoPE
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # training only: keep each block's input and recompute its activations in the backward
    # (torch.utils.checkpoint): less memory for about one more forward
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def resolved(self) -> ModelConfig:
        """A copy with the preset's values filled into fields left unset."""
        if self.size not in MODEL_SIZES:
            raise ConfigError(
                f"model.size: unknown size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}"
            )
        out = ModelConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        for k, v in MODEL_SIZES[self.size].items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        # a model with no layer, no width or no FFN neuron is no model (nothing would be learned
        # or the forward fails); pruning keeps at least one neuron and one layer
        for k in ("vocab_size", "dim", "n_layers", "ffn_dim", "max_seq_len"):
            if getattr(out, k) < 1:
                raise ConfigError(f"model.{k} must be at least 1, got {getattr(out, k)}")
        if out.moe.expert_ffn_dim is not None and out.moe.expert_ffn_dim < 1:
            raise ConfigError("model.moe.expert_ffn_dim must be at least 1 (or null), got "
                              f"{out.moe.expert_ffn_dim}")
        if out.moe.experts:
            check_router_options(out.moe)
        if out.moe.shared_expert_ffn_dim < 0:
            raise ConfigError("model.moe.shared_expert_ffn_dim must be 0 (none) or more, got "
                              f"{out.moe.shared_expert_ffn_dim}")
        if out.moe.shared_expert_gate and out.moe.shared_expert_ffn_dim < 1:
            raise ConfigError("model.moe.shared_expert_gate: true needs a shared expert "
                              "(model.moe.shared_expert_ffn_dim > 0)")
        if out.n_heads < 0 or out.n_kv_heads < 0 or (out.n_heads == 0) != (out.n_kv_heads == 0):
            raise ConfigError(
                f"model.n_heads ({out.n_heads}) and n_kv_heads ({out.n_kv_heads}) must both be "
                "positive (or both 0: a model whose every head was pruned)"
            )
        if out.head_dim is None:
            if out.n_heads == 0 or out.dim % out.n_heads:
                raise ConfigError(
                    f"model.dim ({out.dim}) must be divisible by n_heads ({out.n_heads})"
                )
        elif out.head_dim < 2:
            raise ConfigError(f"model.head_dim must be at least 2, got {out.head_dim}")
        if out.n_heads and out.n_heads % out.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({out.n_heads}) must be divisible by n_kv_heads ({out.n_kv_heads})"
            )
        if out.head_size() % 2:
            raise ConfigError("model.dim / model.n_heads must be even (RoPE rotates pairs)")
        rs = out.rope_scaling
        if rs is not None:
            if rs.rope_type != "llama3":
                raise ConfigError(
                    f"model.rope_scaling.rope_type: {rs.rope_type!r} is not supported (llama3 only)"
                )
            if not (rs.factor > 0 and 0 < rs.low_freq_factor < rs.high_freq_factor):
                raise ConfigError(
                    "model.rope_scaling: needs factor > 0 and 0 < low_freq_factor < "
                    f"high_freq_factor, got {rs.factor}, {rs.low_freq_factor}, "
                    f"{rs.high_freq_factor}"
                )
        return out

    def head_size(self) -> int:
        """Each attention head's size (of a resolved config)."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """Where one domain's documents come from.

    kind: builtin (shipped/standard-library corpora, no network), files (local text, json, jsonl,
    parquet or FASTA files read through `datasets.load_dataset`, FASTA by our own reader), or hf (a
    Hugging Face hub dataset name; needs network or a warm cache).
    """

    kind: str = "builtin"
    paths: list[str] = field(default_factory=list)  # files/globs for kind=files
    name: str | None = None  # hub dataset name for kind=hf
    subset: str | None = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"  # column holding the document text (json/parquet/hub)


@dataclass
class DataConfig:
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    sources: dict[str, SourceConfig] = field(default_factory=dict)  # per-domain override
    bytes_per_domain: int = 400_000  # each domain's corpus is cut to this many bytes (balance)
    seq_len: int = 128  # tokens per training sequence
    heldout_fraction: float = 0.1  # share of documents held out (by document hash)
    stream: str = "mixed"  # mixed | separate | per_domain
    weights: dict[str, float] = field(default_factory=dict)  # mixture weights; empty = uniform
    batch_size: int = 8  # sequences per step (per domain for stream=per_domain)
    num_workers: int = 0
    cache_dir: str | None = None  # where tokenized corpora are cached; None = no cache
    # byte | a Hugging Face tokenizer (a directory or a tokenizer.json file). Unset (null): the
    # tokenizer of the init= checkpoint, else byte. A checkpoint carries its tokenizer; eval,
    # split, assemble and merge always use the checkpoint's.
    tokenizer: str | None = None
    # leakage (moe.data.dedup): strip licence headers from the built-in code and drop held-out
    # documents covered above dedup_threshold by dedup_shingle-byte windows found in training
    dedup: bool = False
    dedup_shingle: int = 50  # bytes per shingle
    dedup_threshold: float = 0.5  # share of a held-out document's bytes


# ----------------------------------------------------------------------------- optim/trainer


SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    # cosine: warm-up, then cosine decay to lr * min_lr_ratio at the end of the run.
    # wsd: warm-up, constant (stable), then a linear cool-down to lr * min_lr_ratio over the last
    #   decay_fraction of the schedule's steps (MiniCPM; Hägele et al. 2024): a run can be forked
    #   or continued from any point of its stable phase. constant: warm-up, then constant.
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: share of the run's steps spent cooling down
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio (cosine, wsd)
    warmup_steps: int = 10
    # length of the schedule in steps; None = trainer.max_steps. A study's seed stops at its fork
    # point (max_steps) of a longer schedule (total_steps), still in the stable phase.
    total_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # which parameters are trained: all | ffn (FFNs and experts, no routers) | moe (FFNs, experts
    # and routers: attention, norms and embeddings frozen, as BTX's option) | experts (MoE
    # experts only) | router (routers only) | embeddings (token embedding and head, e.g. after
    # moe retokenize); None = the stage's own choice (all; ffn with branch.freeze_shared; router
    # with router.freeze_experts). Frozen ones stay in AdamW's groups without gradients, so a
    # run may fork from one that trained another set.
    trainable: str | None = None
    # a torch file of AdamW moments to start from (moe.surgery.optim_state.write_moe_adam_state:
    # {parameter name: {exp_avg, exp_avg_sq, step}}, e.g. a BTX MoE's from its branches); loaded
    # into the fresh optimizer of a run that is neither a resume nor a fork. The LR schedule is
    # still this run's own (warm-up included); only the moments and AdamW's step carry over.
    init_state: str | None = None


@dataclass
class TrainerConfig:
    """Passed to `lightning.Trainer`: loop, precision, devices and strategy live there."""

    max_steps: int = 100
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    val_check_interval: int = 50  # steps between held-out evaluations
    limit_val_batches: int = 4  # held-out batches per domain at each evaluation
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50  # Lightning resume checkpoints (last.ckpt)
    enable_progress_bar: bool = True
    deterministic: bool = False
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    # experiment tracking (moe/train/tracking.py): logs/metrics.csv is always written; this adds
    # one tracker (csv: none), which gets the metrics, the recipe and the ledger. Each keeps its
    # files under logger_dir/<tracker>/ (null: the run directory). wandb runs offline unless
    # WANDB_MODE is set; mlflow uses a local SQLite store unless MLFLOW_TRACKING_URI is set.
    logger: str = "csv"  # csv | tensorboard | wandb | mlflow
    logger_dir: str | None = None
    project: str = "moe-forge"  # the W&B project / MLflow experiment the runs are filed under


# trainer.logger: each tracker and the package it needs (installed by the `track` extra)
LOGGERS: dict[str, str | None] = {
    "csv": None,
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
}


@dataclass
class BranchConfig:
    """Independent branch training: shared weights plus one expert, on one domain's stream."""

    domain: str | None = None
    freeze_shared: bool = False  # train only the expert's FFN


@dataclass
class RouterTrainConfig:
    freeze_experts: bool = True  # router fine-tune: train only the routers


@dataclass
class EvalConfig:
    max_batches: int = 16  # held-out batches per domain (0 = all)
    batch_size: int = 8


ROUTERS = ("learned", "domain")  # model.moe.router
ROUTER_INITS = ("random", "domain_mean")  # an assembled MoE's router rows
ASSEMBLE_SHARED = ("average", "base")  # an assembled MoE's non-FFN weights
STUDY_PROTOCOLS = ("fork", "rewarm")
EVAL_PROTOCOLS = ("rolling", "chunks")  # study.eval_protocol (moe.eval.evaluate)
SHARED_MODES = ("average", "seed", "frozen")
DEFAULT_ARMS = ("seed", "branches", "btm", "average", "family", "btx", "monolith", "monolith_data")


@dataclass
class StudyConfig:
    """`moe run`: the specialization study against one monolithic model at matched compute.

    The budget is the monolith's: `budget_steps` dense steps on the mixed stream, of which the
    first `seed_fraction` are the shared seed run. With protocol=fork (BTM, FlexOlmo) the experts
    fork from that run in its stable phase (weights, AdamW state, step, LR) and the monolith *is*
    the same run continued to the budget; the experts' post-fork compute (branches, the family's
    fine-tunes, and the BTX MoE fine-tune) is sized to the monolith's. protocol=rewarm starts
    every later stage from the seed's weights with a fresh optimizer and warm-up (an ablation).
    Arms are named from the registry in moe/experiments/study/arms (`moe run --list-arms`).
    """

    protocol: str = "fork"  # fork | rewarm
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    experts: list[str] = field(default_factory=lambda: list(DOMAINS))  # one expert per domain
    budget_steps: int = 200  # the monolith's steps, seed included: every arm's compute budget
    # the budget in training FLOPs instead (0: use budget_steps): the monolith's steps are then
    # budget_flops / its FLOPs per step, so models of different sizes get the same compute
    # (a `moe sweep` over model sizes at fixed FLOPs finds the compute-optimal size)
    budget_flops: float = 0.0
    seed_fraction: float = 0.5  # share of the budget trained as the shared seed before branching
    moe_finetune_fraction: float = 0.2  # BTX MoE fine-tune FLOPs / branch FLOPs (BTX Table 3)
    split_method: str = "copy"  # copy | random | kmeans | activation (partitions: rewarm only)
    shared_dim: int = 0  # activation split: size of the shared expert
    shared: str = "average"  # BTX shared weights: average | seed | frozen (FlexOlmo)
    generalist_expert: bool = False  # BTX: the seed's FFN joins the MoE as one more expert
    finetune_family: str | None = "code"  # arm `family`: fine-tunes of this expert, merged back
    finetune_steps: int = 25  # each fine-tune, continued from the family's branch
    finetune_seeds: list[int] = field(default_factory=lambda: [1, 2])  # data order of each
    merge_method: str = "ties"  # how the fine-tunes are merged (a `moe merge` method)
    merge_density: float = 0.5  # ties/dare density
    router_top_k: int = 2  # with renormalised weights, top-1 would leave the router no gradient
    router_init: str = "domain_mean"  # random | domain_mean
    router_lr: float = 1e-2  # peak LR of the MoE fine-tune (a fresh schedule, as in BTX)
    # what the BTX MoE fine-tune trains: all | moe (FFN layers and routers; attention, norms and
    # embeddings frozen)
    moe_trainable: str = "all"
    # the MoE fine-tune's AdamW: fresh (zero moments) | continue (the branches' moments: each
    # expert its branch's, shared weights their mean or the seed's, the router zero)
    moe_optimizer: str = "fresh"
    # how every model is scored (moe.eval.evaluate): "rolling" (as `moe eval`: every held-out
    # document whole in disjoint windows of eval_context tokens, default each model's
    # max_seq_len) or "chunks" (the packed stream in data.seq_len chunks, eval_batches batches)
    eval_protocol: str = "rolling"
    eval_context: int | None = None
    eval_batches: int = 16  # held-out batches per domain for every model (protocol chunks)
    seeds: int = 1  # repetitions with seeds seed, seed+1, ...: mean and 95% CI (`--seeds`)
    equivalence_margin: float = 0.01  # bpb: a gain whose whole interval lies within it is a tie
    bootstrap_iters: int = 2000  # resamples of the seeds × held-out documents bootstrap (report)
    # more held-out sets for every model, as `moe eval --data DOMAIN=PATH_OR_GLOB` (or
    # DOMAIN=hf:NAME) gives them: each evaluated whole, reported in a section of its own
    eval_data: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """`moe sweep`: one study per value of `key` (a dotted recipe key), one report across them."""

    key: str | None = None  # e.g. study.budget_steps
    values: list[Any] = field(default_factory=list)
    # how each value is named in the report (one per value; by default the value itself)
    labels: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str = "run"
    stage: str = "dense"  # dense | branch | joint | router
    seed: int = 1234
    out_dir: str = "runs/${name}"  # run directory
    init: str | None = None  # checkpoint directory to start from (else random init)
    resume: str | None = None  # Lightning .ckpt (or run dir) to resume from
    # fork from another run's Lightning .ckpt (or run dir) into this new run: its weights, AdamW
    # state, step and place in the LR schedule carry over (BTM/FlexOlmo branching); the stage,
    # data stream and end of the schedule are this recipe's. Needs init= (same architecture).
    fork: str | None = None
    # start from a trained checkpoint's weight *distribution* (moe/model/init_dist.py): each
    # tensor re-made by init_method (standard | gaussian | histogram | shuffle | spectrum |
    # select | trained); `select` makes this recipe's (smaller) model section. Excludes init=.
    init_from: str | None = None
    init_method: str = "histogram"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    router: RouterTrainConfig = field(default_factory=RouterTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    init_study: InitStudyConfig = field(default_factory=InitStudyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    surgery: SurgeryStudyConfig = field(default_factory=SurgeryStudyConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)


STAGES = ("dense", "branch", "joint", "router")
TRAINABLE = ("all", "ffn", "moe", "experts", "router", "embeddings")
STREAMS = ("mixed", "separate", "per_domain")
