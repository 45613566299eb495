"""What every arm needs to build its stages: paths, the budget, and the stage builders."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from moe.config import DataConfig, Recipe
from moe.experiments.study.budget import Budget
from moe.io.checkpoint import atomic_write_text, is_checkpoint, read_meta

# no stage's warm-up is longer than this share of its schedule (a short fine-tune must cool down,
# not spend its whole length warming up)
WARMUP_MAX_FRACTION = 0.1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class StudyContext:
    recipe: Recipe
    run_dir: Path
    budget: Budget
    arms: list[str]  # the arms being run (requirements included)

    @property
    def study(self):
        return self.recipe.study

    @property
    def fork(self) -> bool:
        return self.recipe.study.protocol == "fork"

    @property
    def stages_dir(self) -> Path:
        return self.run_dir / "stages"

    def model_dir(self, name: str) -> Path:
        return self.stages_dir / name / "model"

    def resume_ckpt(self, name: str) -> Path:
        return self.stages_dir / name / "resume" / "last.ckpt"

    def done(self, name: str) -> bool:
        return is_checkpoint(self.model_dir(name))

    def record(self, name: str) -> dict:
        """The stage's own training record (meta.json `stage`); {} for stages that do not train."""
        return read_meta(self.model_dir(name)).get("stage") or {}

    def domain_data(self, domain: str) -> DataConfig:
        return dataclasses.replace(
            self.recipe.data, domains=[domain], stream="separate", weights={}
        )

    # ------------------------------------------------------------------ stage builders

    def train(
        self,
        name: str,
        stage: str,
        steps: int,
        *,
        init: Path | None,
        seed: int,
        fork: str | None = None,
        schedule_steps: int | None = None,
        data: DataConfig | None = None,
        lr: float | None = None,
        branch_domain: str | None = None,
        freeze_shared: bool = False,
        model=None,
        trainable: str | None = None,
        optim_state: Path | None = None,
    ) -> None:
        """Train one stage into stages/<name>; resumes a killed run of it.

        `fork` names the stage whose final Lightning state this run continues from (weights,
        AdamW state, step, LR); `steps` is then the global step this run ends at. A run that
        starts a schedule of its own warms up over at most a tenth of it (WARMUP_MAX_FRACTION).
        `model` replaces the recipe's model section (a baseline of another size, from scratch);
        `trainable` the stage's trainable set; `optim_state` a file of AdamW moments to start
        from (moe.surgery.optim_state).
        """
        from moe.train.stages import train

        r = self.recipe
        out = self.stages_dir / name
        resume = self.resume_ckpt(name)
        resuming = resume.is_file()
        t = dataclasses.replace(
            r.trainer, max_steps=steps, val_check_interval=min(r.trainer.val_check_interval, steps)
        )
        length = schedule_steps or steps
        optim = dataclasses.replace(
            r.optim, lr=lr or r.optim.lr, total_steps=length,
            warmup_steps=min(r.optim.warmup_steps, max(1, int(WARMUP_MAX_FRACTION * length))),
        )
        if trainable is not None:
            optim = dataclasses.replace(optim, trainable=trainable)
        if optim_state is not None:
            optim = dataclasses.replace(optim, init_state=str(optim_state))
        rec = dataclasses.replace(
            r,
            name=f"{r.name}/{name}",
            stage=stage,
            seed=seed,
            out_dir=str(out),
            init=str(init) if init else None,
            resume=str(resume) if resuming else None,
            fork=str(self.resume_ckpt(fork)) if fork and not resuming else None,
            overwrite=True,
            trainer=t,
            data=data or r.data,
            optim=optim,
            model=model if model is not None else r.model,
            branch=dataclasses.replace(
                r.branch, domain=branch_domain, freeze_shared=freeze_shared
            ),
        )
        train(rec)

    def split(self, out_stage: str, from_stage: str, method: str | None = None) -> None:
        from moe.surgery.experts import split_checkpoint

        s = self.study
        split_checkpoint(
            self.model_dir(from_stage),
            self.model_dir(out_stage),
            list(s.experts),
            method=method or s.split_method,
            router="learned",
            top_k=s.router_top_k,
            shared_dim=s.shared_dim,
            seed=self.recipe.seed,
            overwrite=True,
        )

    def merge(
        self, out_stage: str, inputs: list[str], base: str | None, method: str, **extra
    ) -> None:
        from moe.merge import merge
        from moe.merge.registry import METHODS

        s = self.study
        cfg: dict = {
            "merge_method": method,
            "models": [
                {"model": str(self.model_dir(p)), "parameters": {"weight": 1.0}} for p in inputs
            ],
            "parameters": {},
            "dtype": "float32",
        }
        if base is not None:
            cfg["base_model"] = str(self.model_dir(base))
        if METHODS[method].uses_density:
            for m in cfg["models"]:
                m["parameters"]["density"] = s.merge_density
            cfg["parameters"]["seed"] = self.recipe.seed
        cfg.update(extra)
        path = self.stages_dir / out_stage / "merge.yaml"
        atomic_write_text(path, json.dumps(cfg, indent=2))  # JSON is valid YAML
        merge(path, self.model_dir(out_stage), overwrite=True, progress=False)
