"""The extract stage: recorded values against independent computations, store, resume, ranks, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorascope import tracking
from lorascope.components import Component, feature_names
from lorascope.errors import LorascopeError
from lorascope.extract.batching import pack_batches
from lorascope.extract.stage import read_documents, run, work_dir
from lorascope.extract.store import INDEX, Store, plan_shards
from lorascope.finetune.params import LoraAdapter
from lorascope.finetune.stage import name_adapter_base
from lorascope.models import load_model
from lorascope.sections import LORA_TARGETS

from tests.conftest import REPO, cli, launch_two_processes, record_output, run_of, tiny_params, tiny_raw

FP32 = {"dtype": "float32", "precision": "float32", "shard_tokens": 1500, "batch_tokens": 2048}


def make_adapter(root: Path, r: int = 1, seed: int = 0, **lora) -> Path:
    """A saved adapter on the workspace's base with *random* A and B (a fresh LoRA has B = 0)."""
    from peft import get_peft_model

    from lorascope.finetune.adapter import lora_config

    base_dir = root / "models" / "base"
    model = load_model(base_dir)
    peft_model = get_peft_model(model, lora_config(LoraAdapter(r=r, **lora), model))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B small enough that the adapted model stays at the base model's scale
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_A" in name else 0.003))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)  # as the finetune stage saves
    out = root / "models" / "lora"
    peft_model.save_pretrained(str(out))
    name_adapter_base(out, base_dir)
    return out


def independent_lora_acts(root: Path, adapter_on: bool = True) -> tuple[list[str], torch.Tensor]:
    """x . A per token: inputs captured by plain pre-hooks on the *unmerged* peft model, one document
    at a time, A read from the saved safetensors file (``adapter_on=False``: the inputs the base model
    alone would feed the same modules)."""
    from contextlib import nullcontext

    from peft import PeftModel
    from safetensors.torch import load_file

    weights = load_file(str(root / "models/lora/adapter_model.safetensors"))
    model = PeftModel.from_pretrained(load_model(root / "models/base"), str(root / "models/lora")).eval()
    n_layers = model.config.num_hidden_layers
    adapted = []  # (layer, kind, A_rI) in component order
    for layer in range(n_layers):
        for kind in LORA_TARGETS:
            part = "self_attn" if kind in LORA_TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{kind}.lora_A.weight"
            if key in weights:
                adapted.append((layer, kind, part, weights[key]))
    names = [
        f"L{layer}.{kind}" if A.shape[0] == 1 else f"L{layer}.{kind}.{i}"
        for layer, kind, _, A in adapted
        for i in range(A.shape[0])
    ]
    captured: dict[int, torch.Tensor] = {}
    layers = model.get_base_model().model.layers
    handles = [
        getattr(getattr(layers[layer], part), kind).register_forward_pre_hook(
            lambda m, args, j=j: captured.__setitem__(j, args[0][0])
        )
        for j, (layer, kind, part, _) in enumerate(adapted)
    ]
    _, docs = read_documents(root / "data/prepared")
    rows = []
    with torch.no_grad(), nullcontext() if adapter_on else model.disable_adapter():
        for doc in docs:
            model(input_ids=torch.tensor([doc]))
            rows.append(torch.cat([captured[j] @ A.T for j, (_, _, _, A) in enumerate(adapted)], 1))
    for h in handles:
        h.remove()
    return names, torch.cat(rows)


def store_matrix(store: Store) -> tuple[torch.Tensor, torch.Tensor]:
    acts, ids = zip(*[(a, i) for _, a, i in store], strict=True)
    return torch.cat(acts).float(), torch.cat(ids)


@pytest.mark.parametrize("rank", [1, 2])
def test_recorded_value_is_x_dot_A(with_prepared: Path, rank: int):
    make_adapter(with_prepared, r=rank, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"])
    out = run(tiny_params(extract=FP32), "lora")
    store = Store.open(out)
    names, expected = independent_lora_acts(with_prepared)
    assert store.components == names
    assert len(names) == 2 * 4 * rank  # 2 layers x 4 adapted projections x rank
    if rank == 2:
        assert names[:3] == ["L0.q_proj.0", "L0.q_proj.1", "L0.o_proj.0"]
    acts, ids = store_matrix(store)
    assert acts.shape == expected.shape
    assert (acts - expected).abs().max() <= 1e-4
    assert expected.std() > 0.1  # the values are not trivially small
    _, without_adapter = independent_lora_acts(with_prepared, adapter_on=False)
    assert (expected - without_adapter)[:, 4 * rank :].abs().max() > 0.05  # B matters downstream
    _, docs = read_documents(with_prepared / "data/prepared")
    assert ids.tolist() == [t for d in docs for t in d]


def test_fast_path_matches_lora_a_hooks(with_prepared: Path):
    make_adapter(with_prepared, r=1)
    merged = Store.open(run(tiny_params(extract=FP32), "lora"))
    merged_acts, _ = store_matrix(merged)
    reference = Store.open(run(tiny_params(extract={**FP32, "method": "lora_a"}), "lora"))
    reference_acts, _ = store_matrix(reference)
    assert merged.components == reference.components and len(merged.components) == 14
    assert merged.components[:8] == [f"L0.{k}" for k in LORA_TARGETS] + ["L1.q_proj"]
    assert (merged_acts - reference_acts).abs().max() <= 1e-4
    assert merged.index["method"] == "merged" and reference.index["method"] == "lora_a"


def test_mlp_baseline_is_the_swiglu_product(with_prepared: Path):
    out = run(tiny_params(extract={**FP32, "mlp_neurons": 5}), "mlp")
    store = Store.open(out)
    assert store.components[:6] == [f"L0.mlp.{i}" for i in range(5)] + ["L1.mlp.0"]
    model = load_model(with_prepared / "models/base").eval()
    captured: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0][0]))
    _, docs = read_documents(with_prepared / "data/prepared")
    rows = []
    with torch.no_grad():
        for doc in docs:
            model(input_ids=torch.tensor([doc]))
            rows.append(
                torch.cat(
                    [(m.act_fn(m.gate_proj(captured[i])) * m.up_proj(captured[i]))[:, :5]
                     for i, m in ((i, layer.mlp) for i, layer in enumerate(layers))],
                    1,
                )
            )  # fmt: skip
    acts, _ = store_matrix(store)
    assert (acts - torch.cat(rows)).abs().max() <= 1e-4
    assert store.index["adapter"] is None


def test_store_index_and_lineage(with_prepared: Path):
    make_adapter(with_prepared)
    finetune_run = record_output("finetune", with_prepared, "models/lora")
    out = run(tiny_params(extract={"shard_tokens": 1500}), "lora")
    index = json.loads((out / INDEX).read_text())
    _, docs = read_documents(with_prepared / "data/prepared")
    lengths = [len(d) for d in docs]
    assert index["dtype"] == "float16" and index["tokens"] == sum(lengths)
    assert [d[2] for d in index["documents"]] == lengths
    assert [d[1] for d in index["documents"]] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert index["shards"] == [s.to_json() for s in plan_shards(lengths, 1500)]
    assert len(index["shards"]) > 3
    store = Store.open(out)
    for shard, acts, ids in store:  # shards hold whole documents
        assert acts.dtype == torch.float16 and ids.dtype == torch.int32
        assert acts.shape == (sum(lengths[shard.first_doc : shard.last_doc]), 14)
    run_ = tracking.client().get_run(run_of(with_prepared, "data/activations/lora"))
    tags = run_.data.tags
    prepared_run = run_of(with_prepared, "data/prepared")
    assert tags["upstream.prepare"] == prepared_run and tags["upstream.finetune"] == finetune_run
    assert run_.data.metrics["tokens"] == sum(lengths) and run_.data.metrics["components"] == 14
    assert run_.data.metrics["tokens_per_second_rank0"] > 0
    assert tags["dvc.out.data/activations/lora"] == tracking.dvc_md5(out)
    assert "run_id" not in index and not (out / "run.json").exists()  # lineage stays in MLflow
    assert not work_dir("lora").exists()


def test_shard_plan_and_batches():
    assert [(s.first_doc, s.last_doc, s.start, s.tokens) for s in plan_shards([5, 5, 20, 3, 3], 10)] == [
        (0, 2, 0, 10),
        (2, 3, 10, 20),  # longer than a shard: alone
        (3, 5, 30, 6),
    ]
    batches = pack_batches([3, 10, 4, 10, 1], 20)
    assert batches == [[1, 3], [2, 0, 4]]  # longest first; 2 x 10 <= 20, then 3 x 4 <= 20
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_kill_and_resume_gives_the_same_store(with_prepared: Path, tmp_path: Path):
    make_adapter(with_prepared)
    params = tiny_params(extract={"shard_tokens": 1200})
    reference = tmp_path / "reference"
    shutil.copytree(run(params, "lora"), reference)
    reference_run = run_of(with_prepared, "data/activations/lora")
    shutil.rmtree(with_prepared / "data/activations")

    class Killed(Exception):
        pass

    def kill_after_three(shard):
        if shard.index == 2:
            raise Killed

    with pytest.raises(Killed):
        run(params, "lora", on_shard=kill_after_three)
    work = work_dir("lora")
    assert sorted(p.name for p in work.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    (work / "shard-00002.safetensors").unlink()  # the last shard is lost ...
    (work / ".shard-00003.safetensors.abc123.tmp").write_bytes(b"half a shard")  # ... and a temp file left
    done = []
    out = run(params, "lora", on_shard=lambda s: done.append(s.index))
    n_shards = len(json.loads((out / INDEX).read_text())["shards"])
    assert done == list(range(2, n_shards))  # shards 0 and 1 were kept
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for shard in out.glob("shard-*"):
        assert shard.read_bytes() == (reference / shard.name).read_bytes()
    fresh, ref = (json.loads((d / INDEX).read_text()) for d in (out, reference))
    assert "run_id" not in fresh and fresh == ref
    assert tracking.dvc_md5(out) == tracking.dvc_md5(reference)  # the same bytes, so DVC sees no change
    fresh_run_id = run_of(with_prepared, "data/activations/lora")  # the latest run that logged them
    run_ = tracking.client().get_run(fresh_run_id)
    assert run_.data.metrics["shards_resumed"] == 2 and fresh_run_id != reference_run


def test_changed_params_start_over(with_prepared: Path):
    make_adapter(with_prepared)

    def stop(shard):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_params(extract={"shard_tokens": 1200}), "lora", on_shard=stop)
    done = []
    run(
        tiny_params(extract={"shard_tokens": 1200, "dtype": "bfloat16"}),
        "lora",
        on_shard=lambda s: done.append(s),
    )
    assert done[0].index == 0  # nothing reused from the float16 run
    assert Store.open(with_prepared / "data/activations/lora").index["dtype"] == "bfloat16"


def test_two_processes_write_the_same_store(with_prepared: Path, tmp_path: Path):
    import yaml

    make_adapter(with_prepared)
    raw = tiny_raw(extract={"shard_tokens": 1200})
    single = tmp_path / "single"
    shutil.copytree(run(tiny_params(extract={"shard_tokens": 1200}), "lora"), single)
    shutil.rmtree(with_prepared / "data/activations")
    (with_prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    res = launch_two_processes(with_prepared, "extract", "--source", "lora")
    assert res.returncode == 0, res.stderr[-3000:]
    out = with_prepared / "data/activations/lora"
    shards = sorted(p.name for p in out.glob("shard-*"))
    assert shards == sorted(p.name for p in single.glob("shard-*")) and len(shards) > 3
    for name in shards:
        assert (out / name).read_bytes() == (single / name).read_bytes()
    two, one = (json.loads((d / INDEX).read_text()) for d in (out, single))
    assert two == one and "run_id" not in two
    metrics = tracking.client().get_run(run_of(with_prepared, "data/activations/lora")).data.metrics
    assert metrics["processes"] == 2


def test_components_follow_the_design_order():
    comps = [Component(1, "q_proj", "m", 1), Component(0, "down_proj", "m", 2), Component(0, "mlp", "m", 2)]
    assert feature_names(comps) == ["L1.q_proj", "L0.down_proj.0", "L0.down_proj.1", "L0.mlp.0", "L0.mlp.1"]


# ------------------------------------------------------------------------------------- bad input
def foreign_adapter(tmp_path: Path) -> Path:
    """An adapter saved on a tiny base of hidden size 32 (the workspace's base has 64)."""
    from lorascope.base.stage import run as run_base

    other = tmp_path / "other"
    other.mkdir()
    (other / "dvc.yaml").write_text("stages: {}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASCOPE_ROOT", str(other))
        run_base(tiny_params(base={"tiny": {"hidden_size": 32}}))
        return make_adapter(other)


def test_adapter_for_another_model_shape(with_prepared: Path, tmp_path: Path):
    """An adapter trained on a wider model of the same name: one line, exit 2."""
    shutil.copytree(foreign_adapter(tmp_path), with_prepared / "models/lora")
    shutil.copy(REPO / "params.yaml", with_prepared)
    res = cli("extract", "--source", "lora", cwd=with_prepared, env={"LORASCOPE_ROOT": str(with_prepared)})
    last = res.stderr.strip().splitlines()[-1]  # above it: transformers' weight-loading bar
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert last.startswith(f"error: {with_prepared}/models/lora: adapter does not match the base model (")
    assert "size mismatch" in last and "torch.Size([1, 32])" in last
    assert not (with_prepared / "data/activations").exists()


def test_adapter_trained_on_another_base(with_prepared: Path):
    adapter = make_adapter(with_prepared)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "lora")
    assert str(e.value) == (
        f"{adapter}: adapter was trained on 'Qwen/Qwen2.5-0.5B-Instruct', but the base model is 'models/base'"
    )


def test_missing_adapter_and_empty_dataset(with_prepared: Path):
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "lora")
    assert str(e.value) == (
        f"{with_prepared}/models/lora: no LoRA adapter (adapter_config.json missing); "
        "run `lorascope finetune --variant lora`"
    )
    import pyarrow.parquet as pq

    path = with_prepared / "data/prepared/train.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(), "mlp")
    assert str(e.value) == f"{path}: no tokens to extract (empty dataset)"


def test_too_many_mlp_neurons(with_prepared: Path):
    with pytest.raises(LorascopeError) as e:
        run(tiny_params(extract={"mlp_neurons": 500}), "mlp")
    assert str(e.value) == "extract.mlp_neurons: the MLP has 128 neurons per layer, got 500"


def test_store_that_disagrees_with_its_index(with_prepared: Path):
    out = run(tiny_params(extract={"shard_tokens": 1500}), "mlp")
    Store.open(out)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(LorascopeError) as e:
        Store.open(out)
    assert str(e.value) == f"{shard}: truncated ({len(data) - 100} bytes, expected {len(data)})"
    shard.unlink()
    shutil.copy(REPO / "params.yaml", with_prepared)
    res = cli("contexts", "--source", "mlp", cwd=with_prepared, env={"LORASCOPE_ROOT": str(with_prepared)})
    assert res.returncode == 2 and res.stderr == f"error: {shard}: listed in index.json but missing\n"
    index = json.loads((out / INDEX).read_text())
    index["tokens"] += 1
    (out / INDEX).write_text(json.dumps(index))
    shard.write_bytes(data)
    with pytest.raises(LorascopeError, match="shards hold .* tokens, the index says"):
        Store.open(out)


# ------------------------------------------------------------------------------ reduced precision
def relative_errors(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per column ``||got - expected|| / ||expected||`` over all tokens."""
    return (got - expected).norm(dim=0) / expected.norm(dim=0)


def scale_lora_B(adapter: Path, factor: float) -> None:
    """Multiply every ``lora_B`` of the saved adapter by ``factor``."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, str(path))


# bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3) and fp16 11 (2^-12 = 2.4e-4); the
# inputs x of the adapted linears carry the rounding of every layer below them, so per component the
# recorded x . A may differ from a float32 computation by a few times that. Measured on the tiny model
# (2 layers, merged path): at most 7.8e-3 (bf16) and 1.1e-3 (fp16); the bounds leave about 3x.
REDUCED = {"bfloat16": 0.025, "float16": 0.004}


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_records_the_adapter(with_prepared: Path, precision: str):
    """bf16 / fp16 extraction (the merged fast path, after its merge check) against an independent
    float32 computation from the saved adapter; before the fix bf16 stopped with a dtype error."""
    make_adapter(with_prepared, r=1)
    out = run(tiny_params(extract={**FP32, "precision": precision}), "lora")
    store = Store.open(out)
    assert store.index["precision"] == precision and store.index["method"] == "merged"
    acts, _ = store_matrix(store)
    names, expected = independent_lora_acts(with_prepared)
    assert store.components == names
    rel = relative_errors(acts, expected)
    print(f"{precision}: relative error per component vs float32: max {rel.max():.2e}")
    assert rel.max() <= REDUCED[precision]
    assert rel[:3].max() <= 2**-8  # layer 0's q/k/v read the embedding: only the input rounding


def test_merge_check_falls_back_when_the_update_rounds_away(with_prepared: Path):
    """An update far below a bf16 ulp of W: merging it into bf16 weights deletes it (the merged
    model is the base model), so extraction must run on the unmerged model."""
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.merge_check import MergeCheck, check_tokens

    adapter = make_adapter(with_prepared, r=1)
    scale_lora_B(adapter, 1e-3)  # |s B A| ~ 1.4e-5, a bf16 ulp of |W| ~ 0.016 is 1.2e-4
    _, docs = read_documents(with_prepared / "data/prepared")
    check = MergeCheck(check_tokens(docs, 2048), 2048, 0.02, 0.01)
    base, cpu = with_prepared / "models/base", torch.device("cpu")
    fp32 = Extractor.load("lora", "merged", base, adapter, "float32", cpu, 1, check)
    bf16 = Extractor.load("lora", "merged", base, adapter, "bfloat16", cpu, 1, check)
    assert fp32.method == "merged" and fp32.merge_report.kl_fraction < 1e-4  # fp32 merges exactly
    report = bf16.merge_report
    assert report.tokens == 2048 and len(report.relative_error) == 14
    assert report.kl_fraction > 0.5  # the merged bf16 model lost (nearly) all of the adapter's effect
    assert bf16.method == "lora_a" and not report.passed
    out = run(tiny_params(extract={**FP32, "precision": "bfloat16"}), "lora")
    store = Store.open(out)
    assert store.index["method"] == "lora_a"
    acts, _ = store_matrix(store)
    _, expected = independent_lora_acts(with_prepared)
    assert relative_errors(acts, expected).max() <= REDUCED["bfloat16"]


def test_merge_check_measures_what_the_two_paths_record(with_prepared: Path):
    """The check's per-component relative errors equal those between a merged extraction (check
    off) and an unmerged (``lora_a``) extraction of the same tokens in bf16."""
    from lorascope.extract.extractor import Extractor
    from lorascope.extract.merge_check import MergeCheck, check_tokens

    adapter = make_adapter(with_prepared, r=1)
    _, docs = read_documents(with_prepared / "data/prepared")
    first = check_tokens(docs, 1024)
    base, cpu = with_prepared / "models/base", torch.device("cpu")
    checked = Extractor.load(
        "lora", "merged", base, adapter, "bfloat16", cpu, 1, MergeCheck(first, 1024, 1, 1)
    )
    merged = Extractor.load("lora", "merged", base, adapter, "bfloat16", cpu, 1)
    unmerged = Extractor.load("lora", "lora_a", base, adapter, "bfloat16", cpu, 1)
    acts_merged, _ = merged.run(first, 1024, "float32")
    acts_unmerged, _ = unmerged.run(first, 1024, "float32")
    expected = relative_errors(acts_merged, acts_unmerged)
    got = torch.tensor(list(checked.merge_report.relative_error.values()))
    assert list(checked.merge_report.relative_error) == merged.names
    assert (got - expected).abs().max() <= 1e-6
    assert 0 < got.max() <= 0.02  # merging this (large) update in bf16 moves x . A, but little
    print(checked.merge_report.summary())
