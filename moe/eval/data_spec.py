"""`moe eval --data SPEC`: evaluate checkpoints on data other than their own recipe's.

A SPEC is one of
- a recipe file (`recipes/x.yaml`): its `data` section, evaluated on that recipe's held-out
  split (documents chosen by hash, exactly what training with that recipe would hold out), so a
  model trained with the recipe is evaluated on documents it never saw;
- `DOMAIN=PATH_OR_GLOB` (repeatable, also for one domain: the paths add up): local files as a
  `files` source (text, json/jsonl, csv, parquet, arrow, FASTA; each optionally gzipped); see
  moe.data.source_files;
- `DOMAIN=hf:NAME[:SPLIT]` or `DOMAIN=hf:NAME:SUBSET:SPLIT`: a hub dataset (needs network or a
  warm `datasets` cache), read up to `data.bytes_per_domain` bytes.

A `DOMAIN=` set is an evaluation set: every one of its documents is held out (no train split and
no byte budget), in file order. Its domain may be a built-in name (`text`) or a new one
(`poems`); a domain-routed MoE has no expert for a new name and reports none for it. Sequence
length and batch come from the checkpoint's recipe; the tokenizer is always the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe.config import ConfigError, DataConfig, SourceConfig

_DOMAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class EvalData:
    specs: list[str]  # as given on the command line
    recipe: DataConfig | None = None  # a recipe's data section (its held-out split)
    sources: dict[str, SourceConfig] = field(default_factory=dict)  # DOMAIN= evaluation sets

    @property
    def domains(self) -> list[str]:
        base = list(self.recipe.domains) if self.recipe is not None else []
        return base + [d for d in self.sources if d not in base]

    def resolve(
        self, ckpt_data: DataConfig, only: list[str] | None
    ) -> tuple[DataConfig, list[str], frozenset[str]]:
        """(data config, domains to evaluate, the domains that are whole evaluation sets) for a
        checkpoint whose own recipe's data section is `ckpt_data`."""
        doms = self.domains
        if only:
            unknown = [d for d in only if d not in doms]
            if unknown:
                raise ConfigError(
                    f"--domains {','.join(unknown)}: not in --data (it gives {', '.join(doms)})"
                )
            doms = list(only)
        base = self.recipe if self.recipe is not None else ckpt_data
        sources = {**base.sources, **self.sources}
        if self.recipe is None:  # shape of the sequences: the checkpoint's own
            base = dataclasses.replace(ckpt_data, sources=sources)
        cfg = dataclasses.replace(base, sources=sources, domains=doms, stream="mixed",
                                  weights={})  # fmt: skip
        return cfg, doms, frozenset(d for d in doms if d in self.sources)

    def input_paths(self) -> list[str]:
        """The local files this evaluation reads (a recipe spec, the DOMAIN= files)."""
        out = [s for s in self.specs if Path(s).is_file()]
        for src in self.sources.values():
            for p in src.paths:
                out += glob.glob(p, recursive=True) if glob.has_magic(p) else [p]
        return out

    def describe(self) -> dict:
        """What the report records about the data."""
        return {"spec": list(self.specs),
                "heldout_only": sorted(self.sources),
                "sources": {d: dataclasses.asdict(s) for d, s in self.sources.items()}}  # fmt: skip


def _hf_source(domain: str, value: str) -> SourceConfig:
    parts = value.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise ConfigError(
            f"--data {domain}={value}: give a hub dataset as hf:NAME, hf:NAME:SPLIT or "
            "hf:NAME:SUBSET:SPLIT"
        )
    if len(parts) == 1:
        return SourceConfig(kind="hf", name=parts[0])
    if len(parts) == 2:
        return SourceConfig(kind="hf", name=parts[0], split=parts[1])
    return SourceConfig(kind="hf", name=parts[0], subset=parts[1], split=parts[2])


def _check_files(domain: str, pattern: str) -> None:
    """A path or glob must name at least one file now, before any checkpoint is evaluated."""
    from moe.data.source_files import no_files

    hits = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
    if not any(Path(h).is_file() for h in hits):
        if glob.has_magic(pattern) or Path(pattern).is_dir():
            what = no_files(pattern, hits)
        else:
            what = "no such file"
        raise ConfigError(f"--data {domain}={pattern}: {what}")


def parse_data_spec(specs: list[str]) -> EvalData:
    """Parse the `--data` arguments (see the module docstring)."""
    from moe.config import load_recipe

    out = EvalData(specs=list(specs))
    for spec in specs:
        key, eq, value = spec.partition("=")
        if eq and _DOMAIN.match(key) and not Path(spec).is_file():
            if not value:
                raise ConfigError(f"--data {spec}: no path after '='")
            if value.startswith("hf:"):
                if key in out.sources:
                    raise ConfigError(f"--data {spec}: domain {key!r} is given twice")
                out.sources[key] = _hf_source(key, value)
                continue
            _check_files(key, value)
            prev = out.sources.get(key)
            if prev is not None and prev.kind != "files":
                raise ConfigError(f"--data {spec}: domain {key!r} is given twice")
            paths = (prev.paths if prev is not None else []) + [value]
            out.sources[key] = SourceConfig(kind="files", paths=paths)
            continue
        if not Path(spec).is_file():
            raise ConfigError(
                f"--data {spec}: neither a recipe file nor DOMAIN=PATH_OR_GLOB nor DOMAIN=hf:NAME"
            )
        if out.recipe is not None:
            raise ConfigError(f"--data {spec}: give one recipe file at most")
        out.recipe = load_recipe(spec).data
    return out
