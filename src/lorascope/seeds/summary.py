"""The across-seed report: each seed's effects, their mean with a 95% interval, min and max; direction and
feature stability over every pair of seeds; the steering curve per seed; the seeds that failed.

An effect is a number every seed reports: per task the base / LoRA / full scores, the LoRA's and the full
finetune's gains over the base, Table 1's recovery and Table 2's share of the LoRA's gain kept by each
ablated adapter; the SAE's held-out FVU and the share of the LoRA's effect its reconstruction keeps; per
steering selector the backtracking rate at the first and last alpha and whether it rose at every step.
The interval is Student's t over seeds (none for one seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

from lorascope.seeds.results import SeedResult
from lorascope.seeds.stability import (
    MATCHED,
    agreement,
    component_signs,
    direction_stability,
    match_features,
    normalised_rows,
)

NOT_EFFECTS = ("ci_low", "ci_high", "ci_dropped", "ci_reason", "reason")
"""Suffixes of ``metrics/recovery.json`` columns that qualify a recovery rather than being one."""
SAE_KEYS = ("fvu", "fvu_normalised", "lora_effect_recovered", "l0_calibrated", "alive_latents")
"""The SAE's metrics compared across seeds (``metrics/sae.json``)."""


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, 95% t-interval, min, max and count of ``values``."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None, "min": None, "max": None}
    half = None
    if len(v) > 1:
        half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    mean = float(v.mean())
    return {
        "n": len(v),
        "mean": mean,
        "ci_low": None if half is None else mean - half,
        "ci_high": None if half is None else mean + half,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def rising(rates: Sequence[float]) -> bool:
    """Whether the rate rises at every step of alpha."""
    return all(b > a for a, b in zip(rates, rates[1:], strict=False))


def effects(r: SeedResult, alphas: Sequence[float]) -> dict[str, float | None]:
    """One seed's effects (see the module docstring), by name."""
    out: dict[str, float | None] = {}
    for task, row in r.recovery.items():
        base, lora, full = row.get("base"), row.get("lora"), row.get("full")
        out[f"{task}.base"], out[f"{task}.lora"], out[f"{task}.full"] = base, lora, full
        if base is not None:
            out[f"{task}.lora_gain"] = None if lora is None else lora - base
            out[f"{task}.full_gain"] = None if full is None else full - base
        for key, value in row.items():
            if key.startswith("recovery") and key.rpartition(".")[2] not in NOT_EFFECTS:
                out[f"{task}.{key}"] = value
    for key in SAE_KEYS:
        if isinstance(r.sae.get(key), int | float):
            out[f"sae.{key}"] = float(r.sae[key])
    for selector, name in steered(r).items():
        curve = steering_curve(r, name, alphas)
        if curve:
            out[f"steer.{selector}.first"], out[f"steer.{selector}.last"] = curve[0], curve[-1]
            out[f"steer.{selector}.rises"] = float(rising(curve))
    for selector in r.steer.get("unmatched", {}):  # no label matched: nothing steered, nothing rose
        out[f"steer.{selector}.rises"] = 0.0
    return out


def steered(r: SeedResult) -> dict[str, str]:
    """Each steered direction under the name params gave it: a ``label:`` selector (whose choice may
    differ between seeds) or the direction's own name."""
    chosen = r.steer.get("selectors", {})
    named = {d: d for d in r.steer.get("directions", {}) if d not in chosen.values()}
    return {**chosen, **named}


def steering_curve(r: SeedResult, name: str, alphas: Sequence[float]) -> list[float]:
    """Backtracking per 1000 tokens along direction ``name``, one value per alpha (empty if absent)."""
    curve = r.steer.get("directions", {}).get(name, {})
    return [curve[f"{a:g}"]["backtracks_per_1k"] for a in alphas if f"{a:g}" in curve]


def stability(results: Sequence[SeedResult]) -> dict[str, Any]:
    """Direction and feature stability over every pair of seeds."""
    per_component: dict[str, dict[str, list[float]]] = {}
    features: list[dict[str, Any]] = []
    for a, b in combinations(results, 2):
        for name, sim in direction_stability(a.adapter, b.adapter).items():
            for k, v in sim.items():
                per_component.setdefault(name, {"A": [], "B": []})[k].append(v)
        if a.W_dec_FD is None or b.W_dec_FD is None or a.components != b.components:
            continue
        signs = component_signs(
            {c: a.adapter[c][0] for c in a.components},
            {c: b.adapter[c][0] for c in b.components},
            a.components,
        )
        match = match_features(
            normalised_rows(a.W_dec_FD, a.rms_D),  # type: ignore[arg-type]
            a.live,
            normalised_rows(b.W_dec_FD, b.rms_D, signs),  # type: ignore[arg-type]
            b.live,
        )
        features.append(
            {
                "seeds": [a.seed, b.seed],
                "live": list(match.live),
                "matched": len(match.matched),
                "share_matched": match.share,
                "label_agreement": agreement(match.matched, a.labels, b.labels),
                "category_agreement": agreement(match.matched, a.categories, b.categories),
                "mean_best_cosine": float(np.mean([p[2] for p in match.pairs])) if match.pairs else None,
            }
        )
    directions = {
        name: {k: interval(v) for k, v in sims.items()}
        for name, sims in sorted(per_component.items(), key=_order)
    }
    return {
        "directions": directions,
        "features": features,
        "features_summary": {
            k: interval([f[k] for f in features if f[k] is not None])
            for k in ("share_matched", "label_agreement", "category_agreement", "mean_best_cosine")
        },
        "matched_at": MATCHED,
    }


def _order(item: tuple[str, Any]) -> tuple[int, str]:
    layer, _, kind = item[0][1:].partition(".")
    return (int(layer), kind) if layer.isdigit() else (1 << 30, item[0])


def summarize(
    results: Sequence[SeedResult], failed: dict[int, str], alphas: Sequence[float], same_base: bool
) -> dict[str, Any]:
    """The whole report as data (``seeds.json``)."""
    per_seed = {r.seed: effects(r, alphas) for r in results}
    names = sorted({k for e in per_seed.values() for k in e})
    return {
        "seeds": [r.seed for r in results],
        "triples": {r.seed: r.triple for r in results},
        "experiments": {r.seed: r.experiment for r in results},
        "failed": failed,
        "per_seed": per_seed,
        "across_seeds": {k: interval([e.get(k) for e in per_seed.values()]) for k in names},  # type: ignore[misc]
        "steering": {
            r.seed: {
                selector: {
                    "direction": name,
                    "alphas": list(alphas),
                    "backtracks_per_1k": steering_curve(r, name, alphas),
                }
                for selector, name in steered(r).items()
            }
            | {
                selector: {
                    "direction": None,
                    "alphas": list(alphas),
                    "backtracks_per_1k": [],
                    "unmatched": why,
                }
                for selector, why in r.steer.get("unmatched", {}).items()
            }
            for r in results
        },
        "stability": stability(results),
        "same_base": same_base,
    }


# ------------------------------------------------------------------------------------ markdown
def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _stat_row(name: str, s: dict[str, Any]) -> str:
    ci = "—" if s["ci_low"] is None else f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]"
    return f"| {name} | {_f(s['mean'])} | {ci} | {_f(s['min'])} | {_f(s['max'])} | {s['n']} |"


def _md_header(report: dict[str, Any]) -> list[str]:
    """The title, the seed triples with their DVC experiments, and the seeds that failed."""
    seeds = report["seeds"]
    lines = [
        "# Results across seeds",
        "",
        f"Seed triples (base, finetune, sae): {', '.join(str(tuple(report['triples'][s].values())) for s in seeds) or 'none'}; "
        f"each a DVC experiment ({', '.join(report['experiments'][s] for s in seeds)}).",
        "",
    ]
    if report["failed"]:
        lines += ["**Failed seeds**: " + "; ".join(f"{s}: {why}" for s, why in report["failed"].items()), ""]
    return lines


def _md_effects(report: dict[str, Any]) -> list[str]:
    """Every effect's mean, interval, min and max across seeds."""
    lines = [
        "## Every effect across seeds",
        "",
        "| effect | mean | 95% CI | min | max | seeds |",
        "|---|---|---|---|---|---|",
    ]
    return lines + [_stat_row(k, s) for k, s in report["across_seeds"].items()]


def _md_tables(report: dict[str, Any]) -> list[str]:
    """Tables 1 and 2 per seed: one table per task, a row per seed, a column per score or recovery."""
    seeds, per_seed = report["seeds"], report["per_seed"]
    lines = ["", "## Tables 1 and 2 per seed", ""]
    tasks = sorted(
        {k.split(".")[0] for e in per_seed.values() for k in e if not k.startswith(("sae.", "steer."))}
    )
    for task in tasks:
        cols = sorted(
            {k.split(".", 1)[1] for e in per_seed.values() for k in e if k.startswith(task + ".")}, key=_col
        )
        lines += [f"**{task}**", "", "| seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [
            f"| {s} | " + " | ".join(_f(per_seed[s].get(f"{task}.{c}")) for c in cols) + " |" for s in seeds
        ]
        lines.append("")
    return lines


def _md_steering(report: dict[str, Any]) -> list[str]:
    """Each seed's steering curve per selector (an unmatched selector says why)."""
    lines = [
        "## Steering per seed",
        "",
        "| seed | selector | direction | backtracks per 1k tokens over alpha | rises at every alpha |",
        "|---|---|---|---|---|",
    ]
    for s in report["seeds"]:
        for selector, c in report["steering"][s].items():
            if c["direction"] is None:
                lines.append(f"| {s} | `{selector}` | — ({c['unmatched']}) | — | no |")
                continue
            curve = " / ".join(_f(v, 2) for v in c["backtracks_per_1k"])
            lines.append(
                f"| {s} | `{selector}` | `{c['direction']}` | {curve} | {'yes' if rising(c['backtracks_per_1k']) else 'no'} |"
            )
    return lines


def _md_directions(report: dict[str, Any]) -> list[str]:
    """Per component, the |cos| of its lora_A and lora_B over seed pairs (a chance baseline when the
    seeds trained different bases)."""
    lines = ["", "## Direction stability", ""]
    if not report["same_base"]:
        lines += [
            "The seeds trained different base models (`base.seed` varies), so a component's coordinates mean "
            "different things in each: these |cos| are a chance baseline, not stability.",
            "",
        ]
    lines += ["| component | lora_A mean (min–max) | lora_B mean (min–max) |", "|---|---|---|"]
    for name, d in report["stability"]["directions"].items():
        lines.append(
            f"| {name} | {_f(d['A']['mean'])} ({_f(d['A']['min'])}–{_f(d['A']['max'])}) | "
            f"{_f(d['B']['mean'])} ({_f(d['B']['min'])}–{_f(d['B']['max'])}) |"
        )
    return lines


def _md_features(report: dict[str, Any]) -> list[str]:
    """Per seed pair, the SAE latents matched by decoder cosine and how often their labels and
    categories agree, then the same over all pairs."""
    stab = report["stability"]
    lines = [
        "",
        f"## Feature stability (SAE latents matched at decoder cosine >= {stab['matched_at']})",
        "",
    ]
    if not report["same_base"]:
        lines += [
            "Each seed's SAE reads its own adapter on its own base model, so latents are not expected to match "
            "(`--vary finetune,sae` keeps one base): this is the chance baseline.",
            "",
        ]
    lines += [
        "| seeds | live latents | matched | share matched | same label | same category | mean assigned cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in stab["features"]:
        lines.append(
            f"| {f['seeds'][0]}, {f['seeds'][1]} | {f['live'][0]}, {f['live'][1]} | {f['matched']} | {_f(f['share_matched'])} | "
            f"{_f(f['label_agreement'])} | {_f(f['category_agreement'])} | {_f(f['mean_best_cosine'])} |"
        )
    lines += ["", "| over all pairs | mean | 95% CI | min | max | pairs |", "|---|---|---|---|---|---|"]
    return lines + [_stat_row(k, s) for k, s in stab["features_summary"].items()]


def markdown(report: dict[str, Any]) -> str:
    """``seeds.md``: the report for a reader."""
    sections = (_md_header, _md_effects, _md_tables, _md_steering, _md_directions, _md_features)
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _col(name: str) -> tuple[int, str]:
    order = ("base", "lora", "full", "lora_gain", "full_gain", "recovery")
    return (order.index(name), name) if name in order else (len(order), name)
