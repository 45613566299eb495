"""What every experiment shares: its run directory (`experiment_dir`), finished runs cached
by name (`cached_run`) and the recipe comparison that decides whether a directory may be
extended (`recipe_changed`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from moe.config import ConfigError, Recipe, to_dict, to_yaml


def experiment_dir(recipe: Recipe, section: str, extends: tuple[str, ...] = ()) -> Path:
    """Prepare an experiment's run directory (the caller holds its lock): `overwrite` empties it;
    a directory whose recorded recipe differs in anything but the section's `seeds` and the
    `extends` keys is refused, since its finished runs (cached per run, reused on resume) would
    be mixed with new ones; the resolved recipe is saved as `recipe.yaml`."""
    from moe.io.checkpoint import atomic_write_text

    out = Path(recipe.out_dir)
    saved = out / "recipe.yaml"
    if recipe.overwrite:
        for p in out.iterdir():
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif saved.is_file() and recipe_changed(saved, recipe, ignore=(f"{section}.seeds", *extends)):
        raise ConfigError(f"{out} holds a run ({section}) of a different recipe; pass "
                          "--overwrite to replace it or choose another out_dir")
    atomic_write_text(saved, to_yaml(recipe))
    return out


def cached_run(out: Path, name: str, fn: Callable[[], dict], label: str,
               summary: Callable[[dict], str] | None = None) -> dict:  # fmt: skip
    """One run of an experiment, cached as `out/runs/<name>.json`: read back if a previous
    invocation finished it (this is how every experiment resumes), else `fn()` computes its
    record, which gains `wall_s` (unless `fn` measured it) and is written atomically, so a killed
    run leaves no record and is redone. Prints `label: name done (... s)` and `summary(rec)`."""
    from moe.io.checkpoint import write_json

    f = out / "runs" / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text())
    f.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rec = fn()
    rec.setdefault("wall_s", time.time() - t0)
    write_json(f, rec)
    extra = f": {summary(rec)}" if summary else ""
    print(f"{label}: {name} done{extra} ({rec['wall_s']:.1f} s)", flush=True)
    return rec


def recipe_changed(saved: Path, recipe: Recipe, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a run directory's recorded recipe differs from `recipe` in anything that changes
    results: where it runs, its name, progress bars, the experiment tracker and the dotted keys
    in `ignore` do not."""
    from omegaconf import OmegaConf

    old = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flat(to_dict(recipe))
    for d in (old, new):
        for key in [*d]:
            if key.split(".")[0] in ("overwrite", "resume", "out_dir", "name", "sweep") or key in (
                "trainer.enable_progress_bar", "trainer.logger", "trainer.logger_dir",
                "trainer.project", *ignore
            ) or any(key.startswith(f"{i}.") for i in ignore):
                d.pop(key)
    # a field added to the schema since the run was recorded, at its default, changes nothing
    default = _flat(to_dict(Recipe()))
    for k in set(new) - set(old):
        if k in default and _same(new[k], default[k]):
            new.pop(k)
    return not _same(old, new)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

