"""Reading a study's `results.json` dict: arms, the reference, branches, domains, bpb lookups.

Every optional part of the results may be missing; these helpers then return None or an empty
list instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence

from moe.experiments.study.report.format import is_num


def model_bpb(model: dict | None, domain: str, key: str = "bpb") -> float | None:
    """A model's eval value (`key`) on one domain; None when missing or not finite."""
    if not model:
        return None
    v = ((model.get("eval") or {}).get(domain) or {}).get(key)
    return float(v) if is_num(v) else None


def complete_mean(xs: Sequence[float | None]) -> float | None:
    """Mean over domains, only when every domain has a value: a partial mean is not comparable."""
    if not xs or any(x is None for x in xs):
        return None
    return sum(xs) / len(xs)  # type: ignore[arg-type]


def arm_table(results: dict) -> list[tuple[str, str]]:
    """(label, model name) of the arms to compare, in the study's order.

    Without an `arms` mapping every evaluated model is its own arm; arms whose model was not
    evaluated are dropped.
    """
    models = results.get("models") or {}
    arms = results.get("arms")
    if not arms:
        return [(name, name) for name in models]
    return [(label, name) for label, name in arms.items() if name in models]


def reference(results: dict) -> tuple[str, str] | None:
    """(label, model) of the compute-matched monolithic reference, or None."""
    models = results.get("models") or {}
    arms = dict(arm_table(results))
    ref = results.get("reference_arm")
    if ref in arms:
        return ref, arms[ref]
    for label, name in arm_table(results):
        if models[name].get("arm") == "compute_matched":
            return label, name
    return None


def experts_arm(results: dict) -> tuple[str, str] | None:
    """(label, model) of the experts arm: the first arm whose model is an MoE.

    Without one among the arms, the model "moe" (router fine-tuned) is preferred over "btx",
    then the last MoE model evaluated.
    """
    models = results.get("models") or {}
    if results.get("arms"):
        for label, name in arm_table(results):
            if models[name].get("arm") == "moe":
                return label, name
    if "moe" in models:
        return "moe", "moe"
    moes = [n for n, m in models.items() if m.get("arm") == "moe"]
    return (moes[-1], moes[-1]) if moes else None


def seed_model(results: dict) -> str | None:
    """The seed model's name: "seed", else the first model of arm "seed"; or None."""
    models = results.get("models") or {}
    if "seed" in models:
        return "seed"
    return next((n for n, m in models.items() if m.get("arm") == "seed"), None)


def branches(results: dict) -> list[tuple[str, str]]:
    """(model name, its domain) of every branch, ordered like `experts` (then the rest)."""
    models = results.get("models") or {}
    found = []
    for name, m in models.items():
        if m.get("arm") == "branch" or (m.get("arm") is None and name.startswith("branch-")):
            dom = m.get("domain") or name.removeprefix("branch-")
            found.append((name, dom))
    order = list(results.get("experts") or []) + list(results.get("domains") or [])
    found.sort(key=lambda nd: order.index(nd[1]) if nd[1] in order else len(order))
    return found


def domains(results: dict) -> list[str]:
    """The study's domains; without them, every domain some model was evaluated on."""
    doms = results.get("domains")
    if doms:
        return list(doms)
    seen: list[str] = []
    for m in (results.get("models") or {}).values():
        for d in m.get("eval") or {}:
            if d not in seen:
                seen.append(d)
    return seen


def eval_sets_view(results: dict) -> dict | None:
    """The results seen through study.eval_data: its sets as the domains and each model's
    results on them as its `eval`, so every table of the study renders them unchanged
    (None when the study has no such sets)."""
    sets = list(results.get("eval_sets") or [])
    if not sets:
        return None
    models = {n: {**m, "eval": m.get("eval_sets") or {}}
              for n, m in (results.get("models") or {}).items()}
    return {**results, "domains": sets, "models": models, "eval_sets": []}


def forgetting(results: dict) -> list[dict]:
    """Every (branch, other domain) pair with bpb and Δ vs the seed, worst (largest Δ) first."""
    models = results.get("models") or {}
    seed = models.get(seed_model(results) or "")
    rows = []
    for name, dom in branches(results):
        for d in domains(results):
            if d == dom:
                continue
            b, s = model_bpb(models[name], d), model_bpb(seed, d)
            if b is None or s is None:
                continue
            rows.append({"branch": name, "domain": d, "bpb": b, "seed": s, "delta": b - s,
                         "rel_pct": 100.0 * (b - s) / s if s else None})
    rows.sort(key=lambda r: -r["delta"])
    return rows


def gains(results: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """label -> domain (and "mean") -> {"delta", "rel_pct"} against the reference arm."""
    ref = reference(results)
    if ref is None:
        return {}
    models, doms = results["models"], domains(results)
    rvals = [model_bpb(models[ref[1]], d) for d in doms]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, name in arm_table(results):
        if label == ref[0]:
            continue
        avals = [model_bpb(models[name], d) for d in doms]
        row = {}
        for d, a, r in zip([*doms, "mean"], [*avals, complete_mean(avals)],
                           [*rvals, complete_mean(rvals)]):
            if a is None or r is None:
                row[d] = {"delta": None, "rel_pct": None}
            else:
                row[d] = {"delta": a - r, "rel_pct": 100.0 * (a - r) / r if r else None}
        out[label] = row
    return out


def specialization_matrix(results: dict) -> tuple[list[str], list[str], list[list[float | None]],
                                                  list[list[float | None]]]:
    """(row models, own domain per row or "", bpb[row][domain], Δ vs seed[row][domain])."""
    models, doms = results["models"], domains(results)
    seed_name = seed_model(results)
    seed = models.get(seed_name or "")
    rows = ([(seed_name, "")] if seed_name else []) + branches(results)
    names = [n for n, _ in rows]
    owns = [d for _, d in rows]
    bpb = [[model_bpb(models[n], d) for d in doms] for n in names]
    delta = [[(b - s) if b is not None and (s := model_bpb(seed, d)) is not None else None
              for b, d in zip(row, doms)] for row in bpb]
    return names, owns, bpb, delta


def command_line(results: dict) -> str:
    """The command that reproduces the study (a placeholder when not recorded)."""
    cmd = results.get("command")
    if cmd:
        return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)
    return "moe run <recipe>"
