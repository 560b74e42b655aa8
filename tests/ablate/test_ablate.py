"""The ablate stage: prefix reuse against full forwards, exactness of the hooks, exported adapters,
the stage's files, resume and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorascope.ablate.runner import DIRECTION, Ablator
from lorascope.ablate.targets import GROUPS, select, sweeps
from lorascope.components import lora_components
from lorascope.errors import LorascopeError
from lorascope.interventions import State, keep_rows
from lorascope.models import load_adapter, load_model
from lorascope.prepare.table import sample
from lorascope.sections import LORA_TARGETS

from tests.conftest import REPO, cli, record_output, run_of, tiny_params

ALL_SWEEPS = ["components", "layers", "types", "groups"]


@pytest.fixture
def ablate_workspace(with_prepared: Path) -> Path:
    """The tiny base, prepared data and a random-B adapter with a finetune lineage record."""
    from tests.extract.test_extract import make_adapter

    make_adapter(with_prepared)
    record_output("finetune", with_prepared, "models/lora", {"finetune.variant": "lora"})
    return with_prepared


def peft_model(root: Path, adapter: str = "models/lora"):  # noqa: ANN201
    return load_adapter(load_model(root / "models/base", dtype=torch.float32), root / adapter).eval()


def sequences(root: Path, n: int = 2, max_tokens: int = 160) -> list[tuple[str, list[int], int]]:
    return sample(root / "data/prepared", n, max_tokens, 0, "ablate.max_tokens")


def test_prefix_reuse_equals_full_forwards(ablate_workspace: Path):
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    ablations = sweeps(comps, ALL_SWEEPS, {"mixed": ["L1.v_proj", "L0.down_proj"]})
    assert len(ablations) == 14 + 2 + 7 + 3 + 1
    for _, ids, first in sequences(ablate_workspace):
        ids_T = torch.tensor(ids)
        lora_n, naive = Ablator(model, comps, batch_size=1, prefix_reuse=False).measure(
            ids_T, first, ablations
        )
        lora_p, prefix = Ablator(model, comps, batch_size=5, logit_chunk=7, prefix_reuse=True).measure(
            ids_T, first, ablations
        )
        assert lora_n.tokens == lora_p.tokens == len(ids) - first
        assert lora_p.ce_sum == pytest.approx(lora_n.ce_sum, rel=1e-6)
        for a, n, p in zip(ablations, naive, prefix, strict=True):
            assert abs(n.kl_sum - p.kl_sum) / n.tokens <= 1e-5, a.name
            assert abs(n.kl_max - p.kl_max) <= 1e-5 and abs(n.ce_sum - p.ce_sum) / n.tokens <= 1e-5
        assert any(n.kl_sum / n.tokens > 1e-4 for n in naive)  # the adapter does something


def test_naive_kl_against_an_independent_computation(ablate_workspace: Path):
    """KL(P_lora || P_ablated) and CE from plain logits: the component's lora_B zeroed in a copy."""
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    _, ids, first = sequences(ablate_workspace, 1)[0]
    ids_1T = torch.tensor(ids)[None]
    ablation = sweeps(comps, ["components"], {})[4]  # L0.gate_proj
    lora, (stats,) = Ablator(model, comps).measure(ids_1T[0], first, [ablation])
    with torch.no_grad():
        logp = model(input_ids=ids_1T).logits[0, first - 1 : -1].log_softmax(-1).double()
        model.get_base_model().get_submodule(comps[4].module).lora_B["default"].weight.zero_()
        logq = model(input_ids=ids_1T).logits[0, first - 1 : -1].log_softmax(-1).double()
    labels = ids_1T[0, first:]
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert stats.kl_sum == pytest.approx(float(kl.sum()), rel=1e-4)
    assert stats.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert stats.ce_sum == pytest.approx(float(-logq.gather(-1, labels[:, None]).sum()), rel=1e-6)
    assert lora.ce_sum == pytest.approx(float(-logp.gather(-1, labels[:, None]).sum()), rel=1e-6)
    assert stats.all_tokens == lora.all_tokens == len(ids) - 1 and stats.tokens == len(ids) - first


def test_kl_over_all_positions_and_response_tokens_by_hand(ablate_workspace: Path):
    """Both KL averages against a hand computation as the paper's code did it (F.kl_div(log P_ablated,
    P_lora) summed over the vocabulary at every position, then per sequence mean and mean over sequences)
    and over response tokens only (pooled), for the ``all`` group (every lora_B zeroed in the model: the
    base); the stage writes both, named, and Figure 3's grids of both."""
    import json

    import torch.nn.functional as F

    from lorascope.ablate.stage import run

    seqs = sequences(ablate_workspace, 2)
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    per_seq_all, resp_sum, resp_tokens = [], 0.0, 0
    for _, ids, first in seqs:
        ids_1T = torch.tensor(ids)[None]
        with torch.no_grad():
            p_lora = F.softmax(model(input_ids=ids_1T[:, :-1]).logits[0].double(), -1)
            with model.disable_adapter():
                p_abl = F.softmax(model(input_ids=ids_1T[:, :-1]).logits[0].double(), -1)
        kl_T = F.kl_div(p_abl.log(), p_lora, reduction="none").sum(-1)  # the paper's call
        per_seq_all.append(float(kl_T.mean()))
        resp_sum += float(kl_T[first - 1 :].sum())
        resp_tokens += len(ids) - first
    params = tiny_params(
        ablate={"sequences": 2, "max_tokens": 160, "sweeps": ["components", "groups"], "precision": "float32"}
    )
    out = run(params)
    doc = json.loads((out / "groups.json").read_text())
    got = doc["ablations"]["all"]
    assert got["kl_all_positions"] == pytest.approx(sum(per_seq_all) / len(per_seq_all), rel=1e-4)
    assert got["kl"] == pytest.approx(resp_sum / resp_tokens, rel=1e-4)
    assert got["kl_all_positions"] != pytest.approx(got["kl"], rel=1e-3)  # the prompt positions count
    assert doc["reference"]["kl_lora_base_all_positions"] == got["kl_all_positions"]
    assert set(doc["kl_definitions"]) == {"kl", "kl_all_positions"}
    assert (
        "response" in doc["kl_definitions"]["kl"]
        and "every position" in doc["kl_definitions"]["kl_all_positions"]
    )
    single = json.loads((out / "components.json").read_text())["ablations"]
    fig3 = json.loads((out / "figure3.json").read_text())
    assert fig3["layers"] == [0, 1] and fig3["types"] == list(LORA_TARGETS)
    for key in ("kl", "kl_all_positions"):  # rows: layers, columns: types
        assert fig3[key] == [[single[f"L{n}.{k}"][key] for k in LORA_TARGETS] for n in (0, 1)]
    assert len(comps) == 14


def test_zero_b_component_has_zero_kl(ablate_workspace: Path):
    weights = ablate_workspace / "models/lora/adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    chosen = [a for a in sweeps(comps, ["components"], {}) if a.name in ("L1.v_proj", "L1.o_proj")]
    _, ids, first = sequences(ablate_workspace, 1)[0]
    for prefix in (False, True):
        ablator = Ablator(model, comps, batch_size=1, prefix_reuse=prefix)
        _, (v_proj, o_proj) = ablator.measure(torch.tensor(ids), first, chosen)
        assert o_proj.kl_sum == 0.0 and o_proj.kl_max == 0.0
        assert v_proj.kl_sum / v_proj.tokens > 1e-5
        # batched rows round differently from a batch of one: a float32 noise floor, far below effects
        _, (v_proj, o_proj) = Ablator(model, comps, batch_size=8, prefix_reuse=prefix).measure(
            torch.tensor(ids), first, chosen
        )
        assert 0 <= o_proj.kl_max <= 1e-5 and o_proj.kl_sum / o_proj.tokens <= 1e-6


def test_all_components_ablated_is_exactly_the_base_model(ablate_workspace: Path):
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    _, ids, _ = sequences(ablate_workspace, 1)[0]
    ids_1T = torch.tensor(ids)[None]
    state = State(model, comps)
    with torch.no_grad(), state.attach():
        with state.changed(keep_rows([range(len(comps))], len(comps), "cpu"), None):
            ablated = model(input_ids=ids_1T).logits
        trained = model(input_ids=ids_1T).logits
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids_1T).logits
    assert torch.equal(ablated, base)
    assert not torch.equal(trained, base)


@pytest.mark.parametrize("group", ["attn", "mlp", "L0", "L1.up_proj"])
def test_exported_adapter_reproduces_the_hook_ablation(ablate_workspace: Path, group: str):
    from lorascope.ablate.export import run_export

    out = run_export(tiny_params(), group)
    assert out == ablate_workspace / f"models/lora-{group}-ablated"
    config = json.loads((out / "adapter_config.json").read_text())
    removed = select(group, lora_components(peft_model(ablate_workspace)))
    if group in GROUPS:  # whole types left: the config lists them, as peft writes it
        assert config["target_modules"] == [k for k in LORA_TARGETS if k not in GROUPS[group]]
    else:
        assert isinstance(config["target_modules"], str)
    exported = peft_model(ablate_workspace, f"models/lora-{group}-ablated")
    left = lora_components(exported)
    assert len(left) == 14 - len(removed)
    assert sum(k.endswith("lora_A.weight") for k in load_file(str(out / "adapter_model.safetensors"))) == len(
        left
    )
    model = peft_model(ablate_workspace)
    comps = lora_components(model)
    assert {c.module for c in left} == {c.module for i, c in enumerate(comps) if i not in removed}
    _, ids, _ = sequences(ablate_workspace, 1)[0]
    ids_1T = torch.tensor(ids)[None]
    state = State(model, comps)
    with torch.no_grad(), state.attach(), state.changed(keep_rows([removed], len(comps), "cpu"), None):
        hooked = model(input_ids=ids_1T).logits
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids_1T).logits, hooked, atol=1e-6, rtol=0)
    names = [f"L{comps[i].layer}.{comps[i].kind}" for i in removed]
    assert json.loads((out / "ablation.json").read_text()) == {"selectors": [group], "removed": names}
    assert not (out / "run.json").exists()
    from lorascope import tracking

    export_run = tracking.client().get_run(run_of(ablate_workspace, f"models/lora-{group}-ablated"))
    tags = export_run.data.tags
    assert tags["lorascope.stage"] == "ablate" and tags["ablate.export"] == group
    assert tags["upstream.finetune"] == run_of(ablate_workspace, "models/lora")
    assert export_run.info.run_name == f"export-{group}"
    assert export_run.data.params == {
        **export_run.data.params,
        "export.group": group,
        "export.removed": str(len(names)),
    }
    record = mlflow.artifacts.download_artifacts(run_id=export_run.info.run_id, artifact_path="export.json")
    assert json.loads(Path(record).read_text()) == {"group": group, "removed": names}


def test_an_exported_adapter_is_written_as_peft_writes_one(ablate_workspace: Path):
    """The weights' metadata is peft's, each component keeps its rank, and the layer selection of the config
    stays only where whole types are left (peft refuses `layers_to_transform` beside a regular expression)."""
    from safetensors import safe_open

    from lorascope.ablate.export import export, saved_components

    src = ablate_workspace / "models/lora"
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # as peft saved it
    config = json.loads((src / "adapter_config.json").read_text())
    comps = saved_components(load_file(str(src / "adapter_model.safetensors")))
    assert [c.width for c in comps] == [config["r"]] * 14 and config["r"] == 1
    # a copy whose config selects the layers (both of them: the same adapter)
    layered = ablate_workspace / "models/lora-layered"
    shutil.copytree(src, layered)
    config.update(layers_to_transform=[0, 1], layers_pattern="layers")
    (layered / "adapter_config.json").write_text(json.dumps(config))
    for selectors, whole in ((["attn"], True), (["L0.q_proj"], False)):
        out = ablate_workspace / f"models/lora-{selectors[0]}-layered"
        export(layered, out, selectors, "test")
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        written = json.loads((out / "adapter_config.json").read_text())
        assert isinstance(written["target_modules"], list) is whole
        kept = ([0, 1], "layers") if whole else (None, None)
        assert (written["layers_to_transform"], written["layers_pattern"]) == kept, selectors
        assert len(lora_components(peft_model(ablate_workspace, str(out.relative_to(ablate_workspace))))) == (
            6 if whole else 13
        )


def test_export_errors_name_what_is_wrong(ablate_workspace: Path, tmp_path: Path):
    from lorascope.ablate.export import export, saved_components

    src = ablate_workspace / "models/lora"
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(src / "adapter_config.json", half)  # the config without the weights
    for where in (tmp_path / "none", half):
        with pytest.raises(LorascopeError) as e:
            export(where, tmp_path / "out", ["attn"], "test")
        assert str(e.value) == (
            f"{where}: no saved LoRA adapter (adapter_config.json and adapter_model.safetensors); "
            "run `lorascope finetune --variant lora`"
        )
    with pytest.raises(LorascopeError) as e:
        export(src, tmp_path / "out", ["attn", "mlp"], "ablate.custom.both")
    assert (
        str(e.value)
        == "ablate.custom.both: 'attn mlp' removes every component; evaluate the base model instead"
    )
    with pytest.raises(LorascopeError, match=r"^ablate\.custom\.x: 'L9' matches no component"):
        export(src, tmp_path / "out", ["L9"], "ablate.custom.x")
    assert not (tmp_path / "out").exists()
    weight = torch.zeros(1, 4)
    with pytest.raises(LorascopeError) as e:
        saved_components({"base_model.model.model.layers.0.mlp.fc1.lora_A.weight": weight})
    assert str(e.value) == (
        "adapter targets 'model.layers.0.mlp.fc1'; expected only "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )
    with pytest.raises(LorascopeError) as e:
        saved_components({"lm_head.weight": weight})
    assert str(e.value) == "the adapter has no LoRA weights"


def test_stage_outputs_lineage_and_resume(ablate_workspace: Path, monkeypatch: pytest.MonkeyPatch):
    from lorascope import tracking
    from lorascope.ablate import stage

    params = tiny_params(
        ablate={"sequences": 3, "max_tokens": 128, "custom": {"q_and_k": ["q_proj", "k_proj"]}}
    )
    calls = {"n": 0}
    measure = Ablator.measure

    def killed_after_two(self, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(Ablator, "measure", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage.run(params)
    assert not (ablate_workspace / "metrics/ablation").exists()
    monkeypatch.setattr(Ablator, "measure", measure)
    out = stage.run(params)
    files = {n: json.loads((out / f"{n}.json").read_text()) for n in (*ALL_SWEEPS, "figure3")}
    run_id = run_of(ablate_workspace, "metrics/ablation/groups.json")
    run = tracking.client().get_run(run_id)
    assert run.data.metrics["sequences_resumed"] == 2.0
    finetune_run = run_of(ablate_workspace, "models/lora")
    assert run.data.tags["upstream.finetune"] == finetune_run
    assert {k: v for k, v in run.data.tags.items() if k.startswith("dvc.out.")} == {
        f"dvc.out.metrics/ablation/{n}.json": tracking.dvc_md5(out / f"{n}.json") for n in files
    }  # every file, from the one run; none of them names it
    assert not (out / "run.json").exists() and not any("run_id" in f for f in files.values())

    for name in (*ALL_SWEEPS, "figure3"):
        assert files[name]["direction"] == DIRECTION == "KL(P_lora || P_ablated)"
        assert files[name]["unit"].startswith("nats per response token")
        assert set(files[name]["kl_definitions"]) == {"kl", "kl_all_positions"}
    # every sweep file: the same header (the sample, the reference block), its sweep's name, its ablations
    chosen = sequences(ablate_workspace, 3, 128)
    header = {k: v for k, v in files["groups"].items() if k not in ("sweep", "ablations")}
    assert set(header) == {"direction", "unit", "delta_ce_definition", "kl_definitions", "sequences", "tokens",
                           "reference"}  # fmt: skip
    assert header["sequences"] == 3 and header["tokens"] == sum(len(ids) - first for _, ids, first in chosen)
    assert header["delta_ce_definition"].startswith("CE(P_ablated) - CE(P_lora)")
    for name in ALL_SWEEPS:
        assert files[name]["sweep"] == name
        assert {k: v for k, v in files[name].items() if k not in ("sweep", "ablations")} == header
    comps, layers, types, groups = (files[n]["ablations"] for n in ALL_SWEEPS)
    assert len(comps) == 14 and set(layers) == {"L0", "L1"} and set(types) == set(LORA_TARGETS)
    assert set(groups) == {"attn", "mlp", "all", "q_and_k"} and groups["q_and_k"]["n_components"] == 4
    ref = files["groups"]["reference"]
    assert set(ref) == {"ce_lora", "ce_base", "kl_lora_base", "kl_lora_base_all_positions"}
    assert groups["all"]["kl"] == ref["kl_lora_base"] > 0
    assert groups["all"]["kl_all_positions"] == ref["kl_lora_base_all_positions"] > 0
    assert ref["ce_lora"] == pytest.approx(groups["all"]["ce"] - groups["all"]["delta_ce"])
    assert groups["all"]["ce"] == ref["ce_base"]
    for a in (*comps.values(), *groups.values()):
        assert a["delta_ce"] == pytest.approx(a["ce"] - ref["ce_lora"])
        assert a["kl"] >= -1e-7 and a["kl_max"] >= a["kl"] and a["kl_stderr"] is not None
    fig = files["figure3"]
    assert fig["layers"] == [0, 1] and fig["types"] == list(LORA_TARGETS)
    for key in ("kl", "kl_all_positions"):
        assert fig[key] == [[comps[f"L{n}.{k}"][key] for k in LORA_TARGETS] for n in (0, 1)]
    # the run: every ablation's three numbers, the reference and the sample as metrics; the files as artifacts
    for sweep in ALL_SWEEPS:
        for name, a in files[sweep]["ablations"].items():
            for key in ("kl", "kl_all_positions", "delta_ce"):
                assert run.data.metrics[f"{sweep}.{name}.{key}"] == pytest.approx(a[key]), (sweep, name, key)
    assert {k: run.data.metrics[f"reference.{k}"] for k in ref} == pytest.approx(ref)
    assert (run.data.metrics["sequences"], run.data.metrics["tokens"]) == (3.0, float(header["tokens"]))
    n_ablations = sum(len(files[n]["ablations"]) for n in ALL_SWEEPS)
    assert {k: run.data.params[k] for k in ("direction", "ablations", "components")} == {
        "direction": DIRECTION, "ablations": str(n_ablations), "components": "14"}  # fmt: skip
    logged = {a.path for a in tracking.client().list_artifacts(run_id, "ablation")}
    assert logged == {f"ablation/{n}.json" for n in files}

    # the per-sequence sums of an uninterrupted run are the resumed run's
    shutil.rmtree(ablate_workspace / "checkpoints/ablate")
    again = json.loads((stage.run(params) / "components.json").read_text())["ablations"]
    assert again == comps

    # one sweep only: the others are written empty, the reference (base model) is still measured
    out = stage.run(tiny_params(ablate={"sequences": 1, "max_tokens": 64, "sweeps": ["layers"]}))
    groups = json.loads((out / "groups.json").read_text())
    assert groups["ablations"] == {} and groups["reference"]["kl_lora_base"] > 0
    assert set(json.loads((out / "layers.json").read_text())["ablations"]) == {"L0", "L1"}
    assert json.loads((out / "figure3.json").read_text())["kl"] == [[None] * 7, [None] * 7]

    # ablate.precision is the model's: bfloat16 moves every number a little
    f32 = groups["reference"]
    bf16 = stage.run(tiny_params(ablate={"sequences": 1, "max_tokens": 64, "sweeps": ["layers"],
                                         "precision": "bfloat16"}))  # fmt: skip
    ref16 = json.loads((bf16 / "groups.json").read_text())["reference"]
    assert ref16 != f32 and ref16 == pytest.approx(f32, rel=0.05)


def test_the_runs_metrics_go_to_mlflow_in_batches_it_accepts(tmp_path: Path):
    """More metrics than MLflow takes in one call (1000; the paper profile's 64-layer sweeps log ~1,600):
    every one arrives, with its value."""
    import mlflow

    from lorascope import tracking
    from lorascope.ablate.stage import _log_run
    from lorascope.ablate.targets import Ablation

    ablations = [Ablation(f"g{i}", "groups", (i % 14,)) for i in range(400)]
    results = {
        a.name: {"kl": i / 7, "kl_all_positions": i / 11, "delta_ce": -i / 13}
        for i, a in enumerate(ablations)
    }
    header = {"sequences": 3, "tokens": 17, "reference": {"ce_lora": 1.5, "ce_base": 2.5, "kl_lora_base": 0.75,
                                                         "kl_lora_base_all_positions": 0.5}}  # fmt: skip
    files = [tmp_path / "groups.json"]
    files[0].write_text("{}")
    mlflow.set_experiment("test-ablate-metric-batches")
    with mlflow.start_run() as run:
        _log_run(header, results, ablations, 1, [None] * 14, files)
    got = tracking.client().get_run(run.info.run_id).data
    want = {f"groups.g{i}.{k}": v for i in range(400) for k, v in results[f"g{i}"].items()}
    want |= {f"reference.{k}": v for k, v in header["reference"].items()}
    want |= {"sequences": 3.0, "tokens": 17.0, "sequences_resumed": 1.0}
    assert got.metrics == pytest.approx(want)
    assert got.params == {"direction": DIRECTION, "ablations": "400", "components": "14"}


def test_sequences_are_sampled_with_response_tokens(ablate_workspace: Path):
    import pyarrow.parquet as pq

    rows = {r["id"]: r for r in pq.read_table(ablate_workspace / "data/prepared/train.parquet").to_pylist()}
    chosen = sample(ablate_workspace / "data/prepared", 5, 100, 3, "ablate.max_tokens")
    assert len(chosen) == 5 and chosen == sample(
        ablate_workspace / "data/prepared", 5, 100, 3, "ablate.max_tokens"
    )
    assert chosen != sample(ablate_workspace / "data/prepared", 5, 100, 4, "ablate.max_tokens")
    for row_id, ids, first in chosen:
        assert ids == rows[row_id]["input_ids"][:100] and first == rows[row_id]["loss_start"] < len(ids)


def test_bad_input_is_one_line(ablate_workspace: Path):
    from lorascope.ablate import stage

    env = {"LORASCOPE_ROOT": str(ablate_workspace)}
    shutil.copy(REPO / "params.yaml", ablate_workspace)
    res = cli("ablate", "export", "--group", "L9", cwd=ablate_workspace, env=env)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --group: 'L9' matches no component of the adapter (the adapter has layers L0..L1 and "
        "types q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; selectors: "
        "L<layer>.<type>, L<layer>, <type>, attn, mlp, all)"
    )
    res = cli("ablate", "export", "--group", "all", cwd=ablate_workspace, env=env)
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "error: --group: 'all' removes every component; evaluate the base model instead"
    )
    assert not list((ablate_workspace / "models").glob("lora-*"))

    params = ablate_workspace / "bad.yaml"
    raw = (REPO / "params.yaml").read_text()
    params.write_text(raw.replace("  custom: {}\n", "  custom: {mine: [L0.q_proj, L3.zz_proj]}\n", 1))
    res = cli("ablate", "--params", str(params), cwd=ablate_workspace, env=env)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        "error: ablate.custom.mine: unknown component 'L3.zz_proj' (the adapter has layers L0..L1"
    )
    assert not (ablate_workspace / "metrics/ablation").exists()
    with pytest.raises(LorascopeError, match=r"no row has a response token within ablate\.max_tokens \(2\)"):
        stage.run(tiny_params(ablate={"max_tokens": 2}))
    if not torch.cuda.is_available():  # the error names the section's key
        with pytest.raises(LorascopeError, match=r"^ablate\.device: 'cuda' asks for a CUDA GPU"):
            stage.run(tiny_params(ablate={"device": "cuda"}))
    assert not (ablate_workspace / "metrics/ablation").exists()
    with pytest.raises(LorascopeError, match="'attn' is a built-in group"):
        tiny_params(ablate={"custom": {"attn": ["q_proj"]}})


def test_profiles_declare_every_field_and_the_papers_setting():
    from lorascope.ablate.params import AblateSection
    from lorascope.config import load_params
    from lorascope.report.params import ReportSection
    from lorascope.steer.params import SteerSection

    from tests.conftest import tiny_raw

    raw = tiny_raw()
    assert set(raw["ablate"]) == set(AblateSection.model_fields)
    assert set(raw["steer"]) == set(SteerSection.model_fields)
    assert set(raw["report"]) == set(ReportSection.model_fields)
    paper = load_params(profile="qwen2.5-32b-paper")
    assert (paper.ablate.sequences, paper.ablate.max_tokens) == (16, 2048)
    assert max(paper.steer.alphas) >= 50  # the tiny organism's adapter moves at alpha 0.25 already
    small = load_params(profile="qwen2.5-0.5b")
    for p in (paper, small, tiny_params()):  # chosen from the labels: no placeholder component
        assert [d.split(":")[0] for d in p.steer.directions] == ["label"]
    for p in (paper, small, tiny_params()):
        assert {f"lora-{g}-ablated" for g in p.ablate.export} <= set(p.evaluate.variants)


# ------------------------------------------------------------------- summaries against hand numbers
def test_summary_against_a_hand_computed_case():
    """Three sequences of per-token sums, summarised by hand: the KL is token-weighted, its standard
    error is the sample standard deviation of the per-sequence means over sqrt(n), the all-position KL is
    the mean of per-sequence means, delta CE is against the adapter's own CE over the same tokens."""
    import math

    import numpy as np

    from lorascope.ablate.runner import Stats
    from lorascope.ablate.stage import summarize

    ablated = [  # tokens, kl_sum, kl_max, ce_sum, all_tokens, all_kl_sum
        Stats(2, 0.2, 0.15, 4.0, 4, 0.8),  # KL mean 0.1, all-position mean 0.2
        Stats(3, 0.9, 0.5, 9.0, 6, 3.0),  # 0.3, 0.5
        Stats(5, 2.5, 0.9, 12.5, 10, 1.0),  # 0.5, 0.1
    ]
    lora = [
        Stats(2, 0.0, 0.0, 3.0, 4, 0.0),
        Stats(3, 0.0, 0.0, 7.5, 6, 0.0),
        Stats(5, 0.0, 0.0, 10.0, 10, 0.0),
    ]
    got = summarize(ablated, lora)
    # means 0.1, 0.3, 0.5: sample variance ((0.2)^2 + 0 + 0.2^2) / 2 = 0.04, sd 0.2, se 0.2 / sqrt(3)
    assert got["kl"] == pytest.approx(3.6 / 10)
    assert got["kl_stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert got["kl_stderr"] == pytest.approx(np.std([0.1, 0.3, 0.5], ddof=1) / np.sqrt(3))
    assert got["kl_all_positions"] == pytest.approx((0.2 + 0.5 + 0.1) / 3)
    assert got["kl_max"] == 0.9
    assert got["ce"] == pytest.approx(25.5 / 10)
    assert got["delta_ce"] == pytest.approx(25.5 / 10 - 20.5 / 10)
    one = summarize(ablated[:1], lora[:1])
    assert one["kl_stderr"] is None and one["kl"] == pytest.approx(0.1)
    # two sequences with equal means have no spread; the pooled KL is token-weighted, not the mean of means
    two = summarize([Stats(1, 0.4, 0.4, 1.0, 2, 0.4), Stats(3, 1.2, 0.6, 3.0, 4, 0.4)], lora[:2])
    assert two["kl_stderr"] == pytest.approx(0.0, abs=1e-15) and two["kl"] == pytest.approx(0.4)
    skew = summarize([Stats(1, 1.0, 1.0, 1.0, 1, 1.0), Stats(3, 0.0, 0.0, 3.0, 3, 0.0)], lora[:2])
    assert skew["kl"] == pytest.approx(0.25) and skew["kl_all_positions"] == pytest.approx(0.5)
    assert skew["kl_stderr"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))


def test_figure3_orientation_cell_by_cell():
    """Rows are layers in ascending order, columns the component types in the fixed order that the adapter
    has; a missing result or component is null. Three layers by four types: a transpose cannot pass."""
    from lorascope.ablate.stage import KL_DEFINITIONS, UNIT, figure3
    from lorascope.components import Component

    kinds = ["v_proj", "q_proj", "down_proj", "gate_proj"]  # out of the canonical order on purpose
    comps = [Component(n, k, f"model.layers.{n}.{k}", 1) for n in (4, 0, 2) for k in kinds]
    comps = [c for c in comps if (c.layer, c.kind) != (2, "down_proj")]  # one layer lacks one type
    results = {f"L{c.layer}.{c.kind}": {"kl": 10.0 * c.layer + kinds.index(c.kind),
                                        "kl_all_positions": -(10.0 * c.layer + kinds.index(c.kind))}
               for c in comps}  # fmt: skip
    del results["L4.gate_proj"]  # not measured
    fig = figure3(comps, results)
    assert fig["layers"] == [0, 2, 4]
    assert fig["types"] == ["q_proj", "v_proj", "gate_proj", "down_proj"]  # LORA_TARGETS order
    assert set(KL_DEFINITIONS) <= set(fig) and fig["direction"] == "KL(P_lora || P_ablated)"
    assert fig["unit"] == UNIT and fig["kl_definitions"] == KL_DEFINITIONS  # the report reads these keys
    code = {"q_proj": 1, "v_proj": 0, "gate_proj": 3, "down_proj": 2}
    expected = [
        [0 + 1, 0 + 0, 0 + 3, 0 + 2],
        [20 + 1, 20 + 0, 20 + 3, None],  # L2.down_proj: no such component
        [40 + 1, 40 + 0, None, 40 + 2],  # L4.gate_proj: no result
    ]
    assert fig["kl"] == expected
    assert fig["kl_all_positions"] == [[None if v is None else -v for v in row] for row in expected]
    for i, layer in enumerate(fig["layers"]):
        for j, kind in enumerate(fig["types"]):
            if fig["kl"][i][j] is not None:
                assert fig["kl"][i][j] == 10.0 * layer + code[kind]


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_ablator_against_zeroed_lora_b_on_a_small_model(prefix_reuse: bool):
    """On a small random Qwen2 made here (no pipeline): every ablation's per-token KL(P_lora || P_ablated)
    sums, maximum and CE over the response, and the KL summed over all positions, against a copy of the
    model with the ablated components' lora_B zeroed; batches of 3 ablations, logits in chunks of 4."""
    import copy

    from tests.extract.test_recorder import IDS, tiny_lora

    model = tiny_lora(1, list(LORA_TARGETS), seed=5, b_std=4.0)  # effects far above float32 noise
    comps = lora_components(model)
    ablations = sweeps(comps, ALL_SWEEPS, {"mixed": ["L1.v_proj", "L0.down_proj"]})
    ids_T, first = IDS[0], 6
    lora, stats = Ablator(model, comps, batch_size=3, logit_chunk=4, prefix_reuse=prefix_reuse).measure(
        ids_T, first, ablations
    )
    with torch.no_grad():
        logp = model(input_ids=ids_T[None]).logits[0, :-1].double().log_softmax(-1)
    labels = ids_T[1:]
    T = len(ids_T)
    assert (lora.tokens, lora.all_tokens, lora.kl_sum, lora.all_kl_sum) == (T - first, T - 1, 0.0, 0.0)
    assert lora.ce_sum == pytest.approx(float(-logp[first - 1 :].gather(-1, labels[first - 1 :, None]).sum()))
    assert len(stats) == len(ablations)
    for ablation, got in zip(ablations, stats, strict=True):
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            for i in ablation.components:
                ablated.get_base_model().get_submodule(comps[i].module).lora_B["default"].weight.zero_()
            logq = ablated(input_ids=ids_T[None]).logits[0, :-1].double().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        assert (got.tokens, got.all_tokens) == (T - first, T - 1), ablation.name
        assert got.kl_sum == pytest.approx(float(kl[first - 1 :].sum()), rel=1e-3, abs=1e-6), ablation.name
        assert got.kl_max == pytest.approx(float(kl[first - 1 :].max()), rel=1e-3, abs=1e-6), ablation.name
        assert got.all_kl_sum == pytest.approx(float(kl.sum()), rel=1e-3, abs=1e-6), ablation.name
        ce = -logq[first - 1 :].gather(-1, labels[first - 1 :, None]).sum()
        assert got.ce_sum == pytest.approx(float(ce), rel=1e-5), ablation.name
    by_name = {a.name: s for a, s in zip(ablations, stats, strict=True)}
    assert by_name["all"].kl_sum > by_name["L1.up_proj"].kl_sum > 0  # the ablations differ


def test_ablator_batches_and_a_response_starting_at_a_chunk_boundary():
    """Batches partition the ablations: with prefix reuse, ablations sharing a start layer, in index order,
    batch_size at most, as few as fit; without, consecutive runs of batch_size. A response that starts at a
    logit chunk's boundary, and KL sums that are the same float64 sums however they are split."""
    from tests.extract.test_recorder import IDS, tiny_lora

    model = tiny_lora(1, list(LORA_TARGETS), seed=5, b_std=4.0)
    comps = lora_components(model)
    ablations = sweeps(comps, ALL_SWEEPS, {"mixed": ["L1.v_proj", "L0.down_proj"]})
    n = len(ablations)
    start = [a.start_layer(comps) for a in ablations]
    assert len(set(start)) > 1
    want = []
    for layer in sorted(set(start)):
        members = [i for i in range(n) if start[i] == layer]
        want += [members[i : i + 3] for i in range(0, len(members), 3)]
    assert Ablator(model, comps, batch_size=3)._batches(ablations) == want
    plain = Ablator(model, comps, batch_size=3, prefix_reuse=False)._batches(ablations)
    assert plain == [list(range(n))[i : i + 3] for i in range(0, n, 3)]
    some = ablations[:5]
    ids_T = IDS[0]
    _, chunked = Ablator(model, comps, batch_size=2, logit_chunk=4).measure(ids_T, 5, some)  # response at 4
    _, whole = Ablator(model, comps, batch_size=2, logit_chunk=64).measure(ids_T, 5, some)
    for a, b in zip(chunked, whole, strict=True):
        # other chunks are other float32 matmul shapes, so another summation order in every log-prob (more
        # so on another CPU's kernels: 7e-6 seen on an AVX2 machine); each token's KL is a difference of
        # them: equal to float32 precision, not to the last bit
        assert a.tokens == b.tokens == len(ids_T) - 5
        assert a.kl_sum == pytest.approx(b.kl_sum, rel=1e-4) and a.kl_max == pytest.approx(b.kl_max, rel=1e-4)
        assert a.ce_sum == pytest.approx(b.ce_sum, rel=1e-5)
    # the response is every predicted token: the response sums and the all-position sums are the same sums
    lora, full = Ablator(model, comps, batch_size=2, logit_chunk=4).measure(ids_T, 1, some)
    assert lora.tokens == lora.all_tokens == len(ids_T) - 1
    for s in full:
        assert s.kl_sum == s.all_kl_sum > 0
        assert s.to_json() == {"tokens": s.tokens, "kl_sum": s.kl_sum, "kl_max": s.kl_max, "ce_sum": s.ce_sum,
                               "all_tokens": s.all_tokens, "all_kl_sum": s.all_kl_sum}  # fmt: skip
