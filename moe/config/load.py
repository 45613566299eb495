"""The recipe loader: YAML (+ `defaults:`), key=value overrides, then the checks.

A recipe is a YAML file whose top-level sections match `Recipe` below. Each component reads its own
section (the model gets `ModelConfig`, the data module `DataConfig`, ...), never the whole recipe.

Loading goes through `OmegaConf.structured(Recipe)` + merge + `to_object`, so an unknown key or a
value of the wrong type fails at load time with one line naming the key and the file. A recipe may
list other recipe files under `defaults:` (paths relative to it), merged first, in order; values may
use omegaconf interpolation (`${model.max_seq_len}`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe.config.check import (
    ConfigError,
    check_finite,
    check_layer,
    explain,
    parse_override,
    read_yaml_mapping,
)
from moe.config.schema import (
    DOMAINS,
    LOGGERS,
    ROUTERS,
    SCHEDULES,
    STAGES,
    STREAMS,
    TRAINABLE,
    ModelConfig,
    Recipe,
    TrainerConfig,
    check_router_options,
)

# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one recipe file with its `defaults:` merged in (no schema yet)."""
    if path.is_file() and path.resolve() in seen:
        raise ConfigError(f"{path}: `defaults` include themselves in a cycle")
    raw = read_yaml_mapping(
        path, "recipe file", "a recipe must be a mapping of sections (model:, data:, ...)"
    )
    defaults = raw.pop("defaults", None) if "defaults" in raw else None
    merged = OmegaConf.create({})
    if defaults is not None:
        if isinstance(defaults, str):
            defaults = [defaults]
        if not isinstance(defaults, (list, ListConfig)):
            raise ConfigError(f"{path}: `defaults` must be a list of recipe files")
        for d in defaults:
            sub = _read_yaml(path.parent / str(d), seen + (path.resolve(),))
            check_layer(sub, Recipe, str(path.parent / str(d)), merged)
            merged = OmegaConf.merge(merged, sub)
    check_layer(raw, Recipe, str(path), merged)
    return OmegaConf.merge(merged, raw)


def load_recipe(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Load a recipe file (or only defaults when `path` is None) with `key=value` overrides."""
    schema = OmegaConf.structured(Recipe)
    where = str(path) if path is not None else "recipe"
    try:
        layers = [schema]
        if path is not None:
            layers.append(_read_yaml(Path(path)))
        cfg = OmegaConf.merge(*layers)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise explain(e, where, Recipe) from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        try:
            layer = parse_override(ov)
            check_layer(layer, Recipe, f"override {ov!r}", cfg)
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise explain(e, f"override {ov!r}", Recipe) from None
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise explain(e, where, Recipe) from None
    check_finite(recipe, where)
    validate(recipe, where)
    return recipe


def validate(r: Recipe, where: str = "recipe") -> None:
    """Checks that span fields (the schema already checked each field's type)."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if r.stage not in STAGES:
        raise bad(f"stage: unknown stage {r.stage!r}; choose one of {', '.join(STAGES)}")
    if r.model.moe.experts:  # before resolved() checks them too, to name the file
        try:
            check_router_options(r.model.moe)
        except ConfigError as e:
            raise bad(str(e)) from None
    m = r.model.resolved()
    d = r.data
    if not d.domains:
        raise bad("data.domains: at least one domain is needed")
    for dom in list(d.domains) + list(d.sources) + list(d.weights):
        if dom not in DOMAINS and dom not in d.sources:
            raise bad(
                f"data: unknown domain {dom!r}; built-in domains are {', '.join(DOMAINS)} "
                "(a new domain needs an entry under data.sources)"
            )
    if len(set(d.domains)) != len(d.domains):
        raise bad("data.domains: a domain is listed twice")
    if d.seq_len < 2:
        raise bad(f"data.seq_len must be at least 2, got {d.seq_len}")
    if d.seq_len > m.max_seq_len and r.init is None:  # with init=, its checkpoint's context
        raise bad(
            f"data.seq_len ({d.seq_len}) is larger than the model's context "
            f"model.max_seq_len ({m.max_seq_len})"
        )
    if not 0.0 < d.heldout_fraction < 1.0:
        raise bad(f"data.heldout_fraction must be in (0, 1), got {d.heldout_fraction}")
    if d.stream not in STREAMS:
        raise bad(f"data.stream: unknown stream {d.stream!r}; choose one of {', '.join(STREAMS)}")
    if d.stream == "separate" and len(d.domains) != 1:
        raise bad("data.stream=separate needs exactly one domain in data.domains")
    if any(w < 0 for w in d.weights.values()) or (d.weights and sum(d.weights.values()) <= 0):
        raise bad("data.weights must be non-negative with a positive sum")
    if d.batch_size < 1 or d.bytes_per_domain < 1:
        raise bad("data.batch_size and data.bytes_per_domain must be positive")
    if d.tokenizer not in (None, "", "byte") and not Path(d.tokenizer).exists():
        raise bad(f"data.tokenizer: no tokenizer at {d.tokenizer!r} (use byte, a tokenizer "
                  "directory or a tokenizer.json file)")
    for dom, s in d.sources.items():
        if s.kind not in ("builtin", "files", "hf"):
            raise bad(f"data.sources.{dom}.kind: unknown kind {s.kind!r} (builtin, files, hf)")
        if s.kind == "files" and not s.paths:
            raise bad(f"data.sources.{dom}.paths: kind=files needs at least one path")
        if s.kind == "hf" and not s.name:
            raise bad(f"data.sources.{dom}.name: kind=hf needs a dataset name")
    moe = m.moe
    if moe.experts:
        if moe.router not in ROUTERS:
            raise bad(f"model.moe.router: unknown router {moe.router!r} ({', '.join(ROUTERS)})")
        if not 1 <= moe.top_k <= len(moe.experts):
            raise bad(
                f"model.moe.top_k ({moe.top_k}) must be between 1 and the number of experts "
                f"({len(moe.experts)})"
            )
        if moe.backend not in ("auto", "triton", "torch", "loop"):
            raise bad(f"model.moe.backend: unknown backend {moe.backend!r}")
    if r.stage == "branch" and r.branch.domain is None:
        raise bad("stage=branch needs branch.domain (e.g. branch.domain=code)")
    if r.trainer.max_steps < 1:
        raise bad(f"trainer.max_steps must be at least 1, got {r.trainer.max_steps}")
    if r.trainer.strategy.startswith("fsdp") and r.trainer.accelerator == "cpu":
        raise bad("trainer.strategy=fsdp needs GPUs (Lightning's FSDP does not run on CPU); "
                  "use trainer.strategy=ddp on CPU")
    if r.trainer.nan_policy not in ("stop", "skip"):
        raise bad(f"trainer.nan_policy: {r.trainer.nan_policy!r} is not one of stop, skip")
    check_logger(r.trainer, where)
    if r.optim.trainable not in (None, *TRAINABLE):
        raise bad(f"optim.trainable: unknown set {r.optim.trainable!r}; choose one of "
                  f"{', '.join(TRAINABLE)}")
    if r.optim.lr <= 0:
        raise bad(f"optim.lr must be positive, got {r.optim.lr}")
    o = r.optim
    if o.schedule not in SCHEDULES:
        raise bad(f"optim.schedule: unknown schedule {o.schedule!r}; choose one of "
                  f"{', '.join(SCHEDULES)}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise bad(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise bad(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        raise bad(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.total_steps is not None and o.total_steps < r.trainer.max_steps:
        raise bad(
            f"optim.total_steps ({o.total_steps}) is shorter than trainer.max_steps "
            f"({r.trainer.max_steps}); the schedule must cover every step"
        )
    if r.init_from is not None and r.init is not None:
        raise bad("init_from= and init= exclude each other: init= continues a checkpoint, "
                  "init_from= re-makes its weights by init_method")
    if r.fork is not None and r.init is None:
        raise bad("fork= needs init= (the checkpoint of the run it forks from, for lineage)")
    if r.fork is not None and r.resume is not None:
        raise bad("fork= and resume= exclude each other: resume continues this run, fork starts "
                  "a new one")


def check_logger(t: TrainerConfig, where: str = "recipe") -> None:
    """`trainer.logger` names a known tracker whose package is installed (looked up, not
    imported), so a run that could not log is refused before anything is trained or written."""
    if t.logger not in LOGGERS:
        raise ConfigError(f"{where}: trainer.logger: unknown logger {t.logger!r}; choose one of "
                          f"{', '.join(LOGGERS)}")
    package = LOGGERS[t.logger]
    if package is None:
        return
    spec = importlib.util.find_spec(package)
    # a folder of that name in the working directory (W&B's own ./wandb) is no package
    if spec is None or spec.origin is None:
        raise ConfigError(f"{where}: trainer.logger={t.logger} needs the {package} package: "
                          "pip install 'moe-forge[track]'")


def to_yaml(r: Any) -> str:
    """The resolved recipe (or any schema object) as YAML, for saving beside a run."""
    return OmegaConf.to_yaml(OmegaConf.structured(r))


def to_dict(r: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(r), resolve=True)  # type: ignore[return-value]


def model_config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a ModelConfig from checkpoint config.json, refusing unknown keys."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), d)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise explain(e, "config.json", ModelConfig) from None
