"""The seeds report (``lorascope.seeds``): subspace and feature stability against hand computations, the
across-seed statistics and markdown on synthetic seed results, the DVC queue's parsing, and the `seeds`
command's one-line errors for bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorascope.seeds import queue, stability, summary
from lorascope.seeds.results import SeedResult

from tests.conftest import REPO, cli

T_975_DF2 = 4.302652729911275
"""Student's t 97.5% quantile with 2 degrees of freedom."""


def abs_cos(u: np.ndarray, v: np.ndarray) -> float:
    u, v = np.ravel(u).astype(np.float64), np.ravel(v).astype(np.float64)
    return abs(float(u @ v)) / (float(np.linalg.norm(u)) * float(np.linalg.norm(v)))


# ------------------------------------------------------------------------------ subspace similarity
def test_subspace_similarity_rank1_is_abs_cos_and_sign_invariant() -> None:
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(1, 9)), rng.normal(size=(1, 9))
    want = abs_cos(u, v)
    assert 0.0 < want < 1.0
    assert stability.subspace_similarity(u, v) == pytest.approx(want, abs=1e-12)
    assert stability.subspace_similarity(-u, v) == pytest.approx(want, abs=1e-12)
    assert stability.subspace_similarity(u, -3.0 * v) == pytest.approx(want, abs=1e-12)
    assert stability.subspace_similarity(u, 5.0 * u) == pytest.approx(1.0, abs=1e-12)


def test_subspace_similarity_rank2_same_row_space_other_basis() -> None:
    rng = np.random.default_rng(1)
    U = rng.normal(size=(2, 7))
    M = rng.normal(size=(2, 2))
    assert abs(np.linalg.det(M)) > 0.1
    assert stability.subspace_similarity(U, M @ U) == pytest.approx(1.0, abs=1e-9)
    # another plane is not the same one
    assert stability.subspace_similarity(U, rng.normal(size=(2, 7))) < 0.99


def test_subspace_similarity_orthogonal_and_half_shared() -> None:
    E = np.eye(6)
    assert stability.subspace_similarity(E[[0, 1]], E[[2, 3]]) == pytest.approx(0.0, abs=1e-12)
    # span{e0, e1} vs span{e0, e2}: principal cosines 1 and 0
    assert stability.subspace_similarity(E[[0, 1]], E[[0, 2]]) == pytest.approx(0.5, abs=1e-12)


def test_direction_stability_shared_components_only() -> None:
    rng = np.random.default_rng(2)

    def adapter() -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(1, 8)), rng.normal(size=(5, 1))

    a = {"L0.q_proj": adapter(), "L1.down_proj": adapter(), "L3.o_proj": adapter()}
    b = {"L0.q_proj": adapter(), "L1.down_proj": adapter(), "L2.up_proj": adapter()}
    got = stability.direction_stability(a, b)
    assert set(got) == {"L0.q_proj", "L1.down_proj"}
    for name, sim in got.items():
        assert set(sim) == {"A", "B"}
        assert sim["A"] == pytest.approx(abs_cos(a[name][0], b[name][0]), abs=1e-12)
        assert sim["B"] == pytest.approx(abs_cos(a[name][1], b[name][1]), abs=1e-12)


# ------------------------------------------------------------------------------ feature matching
COMPONENTS = ["L0.q_proj", "L0.o_proj", "L1.gate_proj", "L1.down_proj", "L2.q_proj", "L10.up_proj"]
F, D = 12, len(COMPONENTS)


def seed_a(rng: np.random.Generator) -> dict:
    return {
        "W": rng.normal(size=(F, D)),
        "rms": rng.uniform(0.5, 3.0, size=D),
        "A": {c: rng.normal(size=(1, 8)) for c in COMPONENTS},
        "B": {c: rng.normal(size=(5, 1)) for c in COMPONENTS},
    }


def seed_like(a: dict, rng: np.random.Generator, flip: np.ndarray, noise: float = 1e-7) -> dict:
    """Seed a's features in another order, each component rescaled by a positive factor (``A`` longer by
    it, ``B`` shorter) and negated where ``flip`` is -1 (``A`` and ``B`` with it), plus tiny noise."""
    perm = rng.permutation(F)
    scale = rng.uniform(0.2, 5.0, size=D)
    W = a["W"][perm] * scale * flip + noise * rng.normal(size=(F, D))
    return {
        "perm": perm,
        "W": W,
        "rms": a["rms"] * scale,
        "A": {
            c: flip[i] * scale[i] * a["A"][c] + noise * rng.normal(size=(1, 8))
            for i, c in enumerate(COMPONENTS)
        },
        "B": {c: flip[i] / scale[i] * a["B"][c] for i, c in enumerate(COMPONENTS)},
    }


FLIP = np.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])


def test_component_signs_follow_lora_A() -> None:
    rng = np.random.default_rng(3)
    a = seed_a(rng)
    b = seed_like(a, rng, FLIP)
    signs = stability.component_signs(a["A"], b["A"], COMPONENTS)
    np.testing.assert_array_equal(signs, FLIP)
    # the order of ``components`` is the order of the signs
    rev = COMPONENTS[::-1]
    np.testing.assert_array_equal(stability.component_signs(a["A"], b["A"], rev), FLIP[::-1])


def test_normalised_rows_are_unit_rows_in_rms_units() -> None:
    rng = np.random.default_rng(4)
    W, rms = rng.normal(size=(F, D)), rng.uniform(0.5, 2.0, size=D)
    signs = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    rows = stability.normalised_rows(W, rms, signs)
    want = W / rms * signs
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(rows, want, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-12)


def test_match_features_recovers_the_permutation_after_rms_and_signs() -> None:
    rng = np.random.default_rng(5)
    a = seed_a(rng)
    b = seed_like(a, rng, FLIP)
    live = list(range(F))
    signs = stability.component_signs(a["A"], b["A"], COMPONENTS)
    rows_a = stability.normalised_rows(a["W"], a["rms"])
    rows_b = stability.normalised_rows(b["W"], b["rms"], signs)
    m = stability.match_features(rows_a, live, rows_b, live)
    assert m.live == (F, F)
    assert len(m.pairs) == F
    # b's latent j is a's latent perm[j]
    assert {(i, j) for i, j, _ in m.pairs} == {(int(b["perm"][j]), j) for j in range(F)}
    assert all(c == pytest.approx(1.0, abs=1e-5) for _, _, c in m.pairs)
    assert [c for _, _, c in m.pairs] == sorted((c for _, _, c in m.pairs), reverse=True)
    assert m.share == 1.0
    assert len(m.matched) == F

    # without the sign correction the same features point elsewhere
    unsigned = stability.match_features(rows_a, live, stability.normalised_rows(b["W"], b["rms"]), live)
    assert unsigned.share < m.share
    # and without the rms normalisation (raw units) the cosines fall too
    raw_a = stability.normalised_rows(a["W"], np.ones(D))
    raw_b = stability.normalised_rows(b["W"], np.ones(D), signs)
    raw = stability.match_features(raw_a, live, raw_b, live)
    assert np.mean([c for *_, c in raw.pairs]) < np.mean([c for *_, c in m.pairs]) - 1e-3


def test_match_features_skips_dead_latents() -> None:
    rng = np.random.default_rng(6)
    a = seed_a(rng)
    b = seed_like(a, rng, FLIP)
    inv = np.argsort(b["perm"])  # a's latent i is b's latent inv[i]
    dead_a = {0, 5}
    dead_b = {int(inv[0]), int(inv[5]), int(inv[7])}
    # a dead row of b that copies a live row of a exactly would match it at 1.0 if it were considered
    signs = stability.component_signs(a["A"], b["A"], COMPONENTS)
    b["W"][int(inv[5])] = a["W"][3] * b["rms"] / a["rms"] * signs
    live_a = [i for i in range(F) if i not in dead_a]
    live_b = [j for j in range(F) if j not in dead_b]
    rows_a = stability.normalised_rows(a["W"], a["rms"])
    rows_b = stability.normalised_rows(b["W"], b["rms"], signs)
    m = stability.match_features(rows_a, live_a, rows_b, live_b)
    assert m.live == (len(live_a), len(live_b)) == (10, 9)
    assert len(m.pairs) == 9
    assert not {i for i, _, _ in m.pairs} & dead_a
    assert not {j for _, j, _ in m.pairs} & dead_b
    assert (3, int(inv[3])) in {(i, j) for i, j, _ in m.pairs}
    # a's latent 7 has lost its partner: every other live latent of b is matched to its own
    assert len(m.matched) == 9
    assert m.share == 1.0
    # no live latents on one side: nothing to pair
    empty = stability.match_features(rows_a, [], rows_b, live_b)
    assert empty.pairs == [] and empty.live == (0, 9) and empty.share == 0.0


def test_agreement_is_the_share_of_pairs_labelled_alike() -> None:
    pairs = [(0, 1, 0.99), (2, 3, 0.97), (4, 5, 0.95), (6, 7, 0.93)]
    a = {0: "wait", 2: "math", 4: "code", 6: "only a"}
    b = {1: "wait", 3: "logic", 5: "code", 9: "not paired"}
    assert stability.agreement(pairs, a, b) == pytest.approx(2 / 3)
    assert stability.agreement(pairs[:2], a, b) == pytest.approx(1 / 2)
    assert stability.agreement(pairs, {6: "x"}, b) is None
    assert stability.agreement([], a, b) is None


# ------------------------------------------------------------------------------ statistics
def test_interval_is_student_t_over_values() -> None:
    values = [0.2, 0.5, 0.9]
    v = np.array(values)
    mean = v.mean()
    half = T_975_DF2 * v.std(ddof=1) / math.sqrt(3)
    got = summary.interval(values)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["ci_low"] == pytest.approx(mean - half, abs=1e-9)
    assert got["ci_high"] == pytest.approx(mean + half, abs=1e-9)
    assert got["min"] == 0.2 and got["max"] == 0.9
    # None and NaN are not values
    assert summary.interval([None, 0.2, float("nan"), 0.5, 0.9]) == pytest.approx(got)  # type: ignore[list-item]


def test_interval_one_value_and_none() -> None:
    one = summary.interval([0.7])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.7)
    assert one["ci_low"] is None and one["ci_high"] is None
    assert one["min"] == one["max"] == pytest.approx(0.7)
    for empty in ([], [None, float("nan")]):
        got = summary.interval(empty)  # type: ignore[arg-type]
        assert got["n"] == 0
        assert got["mean"] is None and got["ci_low"] is None and got["min"] is None


def test_rising_is_strict() -> None:
    assert summary.rising([0.1, 0.2, 0.5])
    assert summary.rising([1.0])
    assert not summary.rising([0.1, 0.2, 0.2, 0.5])
    assert not summary.rising([0.3, 0.3])
    assert not summary.rising([0.5, 0.2, 0.9])


# ------------------------------------------------------------------------------ the report
TASK = "aime24_nofigures"
ALPHAS = [2.0, 0.0, 0.5]
"""Out of order on purpose: the curve follows the alphas as given."""


def seed_result(seed: int, data: dict, scores: tuple[float, float, float, float], curve: dict) -> SeedResult:
    base, lora, full, ablated = scores
    live = list(range(F))
    return SeedResult(
        seed=seed,
        triple={"base": seed, "finetune": seed, "sae": seed},
        experiment=f"seed-{seed}",
        recovery={
            TASK: {
                "base": base,
                "lora": lora,
                "full": full,
                "lora-attn-ablated": ablated,
                "recovery": (lora - base) / (full - base),
                "recovery.lora-attn-ablated": (ablated - base) / (lora - base),
                "recovery.ci_low": 0.01,
                "recovery.ci_high": 0.99,
                "recovery.ci_dropped": 0.1,
                "recovery.lora-attn-ablated.reason": "why not",
            }
        },
        sae={"fvu": 0.1 + seed / 100, "lora_effect_recovered": 0.8 - seed / 100, "other": 3.0},
        steer={
            "selectors": {"label:Wait": "sae.3"},
            "directions": {"sae.3": {k: {"backtracks_per_1k": v} for k, v in curve.items()}},
        },
        adapter={c: (data["A"][c], data["B"][c]) for c in COMPONENTS},
        components=list(COMPONENTS),
        W_dec_FD=data["W"],
        live=live,
        rms_D=data["rms"],
        labels={i: f"feature {i}" for i in live},
        categories={i: f"category {i % 3}" for i in live},
    )


@pytest.fixture
def three_seeds() -> list[SeedResult]:
    rng = np.random.default_rng(7)
    a = seed_a(rng)
    b = seed_like(a, rng, FLIP)
    c = seed_like(a, rng, -FLIP)
    ra = seed_result(0, a, (0.1, 0.9, 1.0, 0.1), {"0": 0.2, "0.5": 0.4, "2": 0.9})
    rb = seed_result(1, b, (0.2, 0.6, 0.8, 0.4), {"0": 0.3, "0.5": 0.3, "2": 0.7})
    rc = seed_result(2, c, (0.0, 0.5, 0.5, 0.5), {"0": 0.1, "2": 0.6, "1": 5.0})
    # labels and categories travel with the feature, so they follow each seed's permutation
    for r, d in ((rb, b), (rc, c)):
        r.labels = {j: ra.labels[int(d["perm"][j])] for j in range(F)}
        r.categories = {j: ra.categories[int(d["perm"][j])] for j in range(F)}
    rc.labels[0] = "relabelled"
    return [ra, rb, rc]


def test_summarize_effects_across_seeds_and_steering(three_seeds: list[SeedResult]) -> None:
    report = summary.summarize(three_seeds, {}, ALPHAS, same_base=True)
    assert report["seeds"] == [0, 1, 2]
    assert report["experiments"] == {0: "seed-0", 1: "seed-1", 2: "seed-2"}
    per_seed = report["per_seed"]
    e0 = per_seed[0]
    assert e0[f"{TASK}.lora_gain"] == pytest.approx(0.9 - 0.1)
    assert e0[f"{TASK}.full_gain"] == pytest.approx(1.0 - 0.1)
    assert e0[f"{TASK}.recovery"] == pytest.approx(0.8 / 0.9)
    assert e0[f"{TASK}.recovery.lora-attn-ablated"] == pytest.approx(0.0)
    assert e0["sae.fvu"] == pytest.approx(0.1)
    assert "sae.other" not in e0
    # confidence bounds and reasons are not effects
    assert not [k for k in e0 if ".ci_" in k or k.endswith(".reason")]
    # the first and last alpha as passed, and whether the rate rose at every alpha as passed
    assert e0["steer.label:Wait.first"] == 0.9 and e0["steer.label:Wait.last"] == 0.4
    assert e0["steer.label:Wait.rises"] == 0.0

    gains = [0.9 - 0.1, 0.6 - 0.2, 0.5 - 0.0]
    for s, g in enumerate(gains):
        assert per_seed[s][f"{TASK}.lora_gain"] == pytest.approx(g)
    across = report["across_seeds"][f"{TASK}.lora_gain"]
    assert across["n"] == 3
    assert across["mean"] == pytest.approx(float(np.mean(gains)))
    half = T_975_DF2 * float(np.std(gains, ddof=1)) / math.sqrt(3)
    assert across["ci_low"] == pytest.approx(float(np.mean(gains)) - half)
    assert report["across_seeds"]["sae.fvu"]["mean"] == pytest.approx(np.mean([0.1, 0.11, 0.12]))
    assert report["across_seeds"]["sae.fvu"]["max"] == pytest.approx(0.12)

    # the curve in the order of ``ALPHAS``; an alpha a seed did not run is left out
    steering = report["steering"]
    assert steering[0]["label:Wait"] == {
        "direction": "sae.3",
        "alphas": ALPHAS,
        "backtracks_per_1k": [0.9, 0.2, 0.4],
    }
    assert steering[1]["label:Wait"]["backtracks_per_1k"] == [0.7, 0.3, 0.3]
    assert steering[2]["label:Wait"]["backtracks_per_1k"] == [0.6, 0.1]


def test_summarize_stability_over_pairs(three_seeds: list[SeedResult]) -> None:
    stab = summary.summarize(three_seeds, {}, ALPHAS, same_base=True)["stability"]
    # components in layer order (L10 after L2), every pair's A and B the same up to scale and sign
    assert list(stab["directions"]) == [
        "L0.o_proj",
        "L0.q_proj",
        "L1.down_proj",
        "L1.gate_proj",
        "L2.q_proj",
        "L10.up_proj",
    ]
    for d in stab["directions"].values():
        assert d["A"]["n"] == d["B"]["n"] == 3
        assert d["A"]["mean"] == pytest.approx(1.0, abs=1e-6)
        assert d["B"]["mean"] == pytest.approx(1.0, abs=1e-9)
    features = stab["features"]
    assert [f["seeds"] for f in features] == [[0, 1], [0, 2], [1, 2]]
    for f in features:
        assert f["live"] == [F, F]
        assert f["matched"] == F and f["share_matched"] == 1.0
        assert f["category_agreement"] == 1.0
        assert f["mean_best_cosine"] == pytest.approx(1.0, abs=1e-6)
    # seed 2 relabelled one latent: one pair of F disagrees with each other seed
    assert [f["label_agreement"] for f in features] == pytest.approx([1.0, (F - 1) / F, (F - 1) / F])
    assert stab["features_summary"]["label_agreement"]["mean"] == pytest.approx((1 + 2 * (F - 1) / F) / 3)
    assert stab["matched_at"] == stability.MATCHED


def steering_rows(md: str) -> list[str]:
    section = md.split("## Steering per seed", 1)[1].split("## Direction stability", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| seed")]


def test_markdown_rows_failed_seeds_and_base_note(three_seeds: list[SeedResult]) -> None:
    failed = {5: "error: finetune: loss is NaN"}
    report = summary.summarize(three_seeds[:2], failed, ALPHAS, same_base=False)
    assert report["failed"] == failed
    assert report["seeds"] == [0, 1]
    md = summary.markdown(report)
    assert "**Failed seeds**: 5: error: finetune: loss is NaN" in md
    rows = steering_rows(md)
    assert len(rows) == 2
    assert rows[0].startswith("| 0 | `label:Wait` | `sae.3` | 0.90 / 0.20 / 0.40 | no |")
    assert rows[1].startswith("| 1 | `label:Wait` | `sae.3` | 0.70 / 0.30 / 0.30 | no |")
    directions, features = md.split("## Direction stability", 1)[1].split("## Feature stability", 1)
    assert "chance baseline" in directions and "chance baseline" in features
    # Table 1 per seed: one row per seed under the task
    table = md.split(f"**{TASK}**", 1)[1].split("\n\n", 2)[1]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| 0", "| 1"]
    assert f"| {TASK}.lora_gain | 0.600 |" in md  # mean of 0.8 and 0.4

    same = summary.markdown(summary.summarize(three_seeds, {}, ALPHAS, same_base=True))
    assert "chance baseline" not in same
    assert "Failed seeds" not in same
    assert len(steering_rows(same)) == 3
    # a curve that rises at every alpha; one seed alone has no pairs to compare
    data = seed_a(np.random.default_rng(8))
    one = seed_result(9, data, (0.1, 0.2, 0.3, 0.1), {"0": 0.1, "0.5": 0.2, "2": 0.3})
    report = summary.summarize([one], {}, [0.0, 0.5, 2.0], same_base=True)
    assert report["per_seed"][9]["steer.label:Wait.rises"] == 1.0
    assert report["stability"]["features"] == [] and report["stability"]["directions"] == {}
    assert steering_rows(summary.markdown(report)) == [
        "| 9 | `label:Wait` | `sae.3` | 0.10 / 0.20 / 0.30 | yes |"
    ]
    # a seed whose labels matched no selector: reported as such, and it did not rise
    one.steer = {"selectors": {}, "directions": {}, "unmatched": {"label:Wait": "no ok label matches it"}}
    report = summary.summarize([one], {}, [0.0, 0.5, 2.0], same_base=True)
    assert report["per_seed"][9]["steer.label:Wait.rises"] == 0.0
    assert "steer.label:Wait.first" not in report["per_seed"][9]
    assert steering_rows(summary.markdown(report)) == [
        "| 9 | `label:Wait` | — (no ok label matches it) | — | no |"
    ]


# ------------------------------------------------------------------------------ the queue
def test_overrides_set_each_varied_seed() -> None:
    assert queue.overrides(3, ["base", "sae"]) == ["-S", "base.seed=3", "-S", "sae.seed=3"]
    assert queue.overrides(0, []) == []


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("01a4ccf  seed-3  03:36 AM   Failed", ("01a4ccf", "seed-3", "Failed")),
        ("97b66d8  seed-1  03:36 AM   Success", ("97b66d8", "seed-1", "Success")),
        ("5d2c0a9e  seed-12  Jan 03, 2025   Running  ", ("5d2c0a9e", "seed-12", "Running")),
    ],
)
def test_status_line_parses(line: str, want: tuple[str, str, str]) -> None:
    m = queue._STATUS.match(line.strip())
    assert m is not None
    assert (m[1], m[2], m[3]) == want


def test_status_header_does_not_parse() -> None:
    assert queue._STATUS.match("Task     Name    Created    Status") is None


# ------------------------------------------------------------------------------ the command
@pytest.fixture
def seeds_ws(workspace: Path) -> Path:
    """A workspace with the repo's params.yaml and dvc.yaml: everything but git and DVC in place."""
    shutil.copy(REPO / "params.yaml", workspace / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    return workspace


def edit_params(root: Path, section: str, key: str, value: object) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def fails(root: Path, *args: str) -> str:
    """``lorascope seeds <args>`` in ``root``: exit 2 with one ``error:`` line (returned), no report."""
    r = cli("seeds", *args, cwd=root, env={"LORASCOPE_ROOT": str(root)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (root / "reports" / "seeds.md").exists()
    assert not (root / "reports" / "seeds.json").exists()
    return lines[0]


def test_seeds_n_zero(seeds_ws: Path) -> None:
    assert "--n" in fails(seeds_ws, "--n", "0")


def test_seeds_repeated(seeds_ws: Path) -> None:
    line = fails(seeds_ws, "--seeds", "1,2,1")
    assert "lists 1 more than once" in line
    assert "2" not in line


def test_seeds_n_and_list(seeds_ws: Path) -> None:
    line = fails(seeds_ws, "--n", "2", "--seeds", "1")
    assert "--n" in line and "--seeds" in line


def test_seeds_not_integers(seeds_ws: Path) -> None:
    assert "'a,b'" in fails(seeds_ws, "--seeds", "a,b")


def test_seeds_no_steering_directions(seeds_ws: Path) -> None:
    edit_params(seeds_ws, "steer", "directions", [])
    assert "steer.directions" in fails(seeds_ws, "--n", "2")


def test_seeds_without_full_variant(seeds_ws: Path) -> None:
    raw = yaml.safe_load((seeds_ws / "params.yaml").read_text())
    variants = {k: v for k, v in raw["evaluate"]["variants"].items() if k != "full"}
    edit_params(seeds_ws, "evaluate", "variants", variants)
    line = fails(seeds_ws, "--n", "2")
    assert "evaluate.variants" in line and "full" in line


def test_seeds_dvc_yaml_without_stages(seeds_ws: Path) -> None:
    (seeds_ws / "dvc.yaml").write_text("stages: {}\n")
    line = fails(seeds_ws, "--n", "2")
    assert "dvc.yaml" in line and "recovery" in line


@pytest.mark.parametrize("with_git", [False, True])
def test_seeds_outside_git_dvc_repo(seeds_ws: Path, with_git: bool) -> None:
    if with_git:
        (seeds_ws / ".git").mkdir()  # git alone is not enough: no .dvc/
    line = fails(seeds_ws, "--n", "2")
    assert "git" in line and "DVC" in line
