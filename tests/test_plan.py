"""`lorascope plan`: memory and disk against hand computations, launcher sharding, shipped and local
architectures, what does not fit, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lorascope import plan as planner
from lorascope.architectures import SHIPPED, Architecture

from tests.conftest import REPO, cli, tiny_params

# The tiny profile's model: hidden 64, intermediate 128, 2 layers, 4 heads of 16 with 2 KV heads (K = 32),
# vocab 2048, tied embeddings. By hand, per layer: q 64*64, k 64*32, v 64*32, o 64*64, gate and up 64*128,
# down 128*64 = 36,864 weights, q/k/v biases 64 + 32 + 32, two norms 2*64 -> 37,120.
P_TINY = 2048 * 64 + 2 * 37_120 + 64  # embedding (tied head) + layers + final norm = 205,376
LORA_TINY = 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # rank 1: in + out per projection = 2,048


def tiny_plan(workspace: Path, device: str = "cpu", **sections: dict) -> dict[str, dict]:
    """The plan of the tiny profile on data of 10 rows / 4,000 tokens / longest 400."""
    prepared = workspace / "metrics" / "prepare.json"
    prepared.parent.mkdir(parents=True, exist_ok=True)
    prepared.write_text(json.dumps({"rows": 10, "tokens_total": 4000, "tokens_max": 400}))
    result = planner.run(tiny_params(**sections), workspace, device, prepared)
    assert result["architecture"]["params"] == P_TINY
    return {s["stage"]: s for s in result["stages"]}


def test_tiny_memory_and_disk_by_hand(workspace: Path):
    stages = tiny_plan(workspace)  # float32 on the CPU, one process, no checkpointing, micro-batch 4
    full, lora = stages["finetune@full"]["memory"], stages["finetune@lora"]["memory"]
    assert full["weights"] == 4 * P_TINY == 821_504
    assert full["gradients"] == 821_504 and full["optimizer"] == 2 * 821_504  # Adam: two moments
    # per token and layer 4 B x (5 x 64 + 2 x 32 + 4 x 128) = 3,584; 2 layers x 400 tokens; the loss:
    # 400 x 2048 logits x (4 + 8) B; micro-batch 4
    assert full["activations"] == 4 * (2 * 400 * 3_584 + 400 * 2048 * 12) == 50_790_400
    assert lora["weights"] == 4 * P_TINY + 4 * LORA_TINY and lora["optimizer"] == 8 * LORA_TINY
    # the adapters' inputs add 4 B x (6 x 64 + 128) = 2,048 per token and layer
    assert lora["activations"] == 4 * (2 * 400 * (3_584 + 2_048) + 400 * 2048 * 12) == 57_344_000
    assert stages["extract@lora"]["disk"] == 4000 * (14 * 2 + 4) == 128_000  # float16 store + int32 ids
    assert stages["extract@mlp"]["disk"] == 4000 * (2 * 16 * 2 + 4) == 272_000  # 16 neurons x 2 layers
    sae = stages["sae"]["memory"]  # d_in 14, d_sae 56: W_enc, W_dec, b_enc, b_dec = 1,638 float32
    assert (sae["weights"], sae["gradients"], sae["optimizer"]) == (6_552, 6_552, 13_104)
    assert stages["sae"]["disk"] == 20 * 1_638
    assert stages["ablate-export"]["disk"] == 2 * 4 * LORA_TINY  # attn and mlp, float32 adapters
    assert all(s["fits"] for s in stages.values())


def test_fsdp_shards_training_state(workspace: Path):
    shutil.copytree(REPO / "pipelines" / "accelerate", workspace / "pipelines" / "accelerate")
    launcher = "accelerate launch --config_file pipelines/accelerate/fsdp.yaml -m lorascope.cli"
    stages = tiny_plan(
        workspace,
        "h200",
        finetune={"launcher": launcher, "precision": "bfloat16", "gradient_checkpointing": True},
    )
    full = stages["finetune@full"]
    assert full["devices"] == 8  # num_processes of fsdp.yaml
    m = full["memory"]
    assert m["weights"] == m["gradients"] == 2 * P_TINY / 8  # bf16, sharded over 8
    assert m["optimizer"] == 4 * P_TINY / 8
    assert m["gathered layers"] == 2 * 37_120 * 2  # the current and the prefetched layer, unsharded
    # checkpointing: the 2 layers' inputs (400 x 64 x 2 B each) + one layer recomputed (400 x 2 B x 896)
    # + the loss (400 x 2048 x (2 + 8) B), micro-batch 4
    assert m["activations"] == 4 * (2 * 400 * 64 * 2 + 400 * 2 * 896 + 400 * 2048 * 10) == 36_044_800
    assert stages["extract@lora"]["devices"] == 1  # extract.launcher is plain lorascope here
    assert planner.parse_launcher(
        "accelerate launch --multi_gpu --num_processes=4 -m lorascope.cli", workspace
    ) == (planner.Launch(4, "ddp"))


def test_paper_profile_on_an_h100_flags_what_does_not_fit():
    from lorascope.config import load_params

    arch = SHIPPED["Qwen/Qwen2.5-32B-Instruct"]
    layer = 26_219_520 + 2 * 5_243_904 + 26_214_400 + 2 * 141_557_760 + 141_557_760 + 2 * 5120
    assert arch.layer_params == layer == 487_605_248
    assert arch.params == 2 * 152_064 * 5120 + 64 * layer + 5120 == 32_763_876_352  # untied head
    assert SHIPPED["Qwen/Qwen2.5-0.5B-Instruct"].params == 494_032_768
    assert arch.lora_params(
        1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ) == (64 * (10240 + 6144 + 6144 + 10240 + 32768 + 32768 + 32768))
    result = planner.run(load_params(profile="qwen2.5-32b-paper"), REPO, "h100")
    stages = {s["stage"]: s for s in result["stages"]}
    assert result["data"]["rows"] == 1000 and "estimated" in result["data"]["source"]
    # one bf16 copy of the 32.8B parameters per GPU for extraction (+ the float32 adapter); the splice KL
    # needs that copy plus 3 x 20k x V float32 logits: more than 80 GB
    assert stages["extract@lora"]["memory"]["weights"] == pytest.approx(2 * 32_763_876_352 + 4 * 64 * 131_072)
    assert stages["extract@lora"]["fits"] and not stages["sae"]["fits"]
    assert stages["extract@lora"]["disk"] == pytest.approx(9_000_000 * (448 * 2 + 4))
    text = planner.render(result)
    assert "DOES NOT FIT" in text and "sae" in text and result["total_gpu_hours"] > 0


def test_local_config_json_and_unknown_models(tmp_path: Path):
    model = tmp_path / "my-model"
    model.mkdir()
    cfg = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}  # fmt: skip
    (model / "config.json").write_text(json.dumps(cfg))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["model"] = str(model)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    res = cli("plan", "--params", str(params_file), "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    arch = json.loads(res.stdout)["architecture"]
    expected = Architecture(128, 256, 3, 4, 4, 1000, False)
    assert (
        arch["params"]
        == expected.params
        == 2 * 1000 * 128 + 3 * (4 * 128 * 128 + 3 * 128 * 256 + 3 * 128 + 256) + 128
    )
    raw["base"]["model"] = "org/unknown-model"
    params_file.write_text(yaml.safe_dump(raw))
    res = cli("plan", "--params", str(params_file))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(
        "error: base.model: no architecture numbers for 'org/unknown-model' (shipped: "
    )
    assert len(res.stderr.strip().splitlines()) == 1
    res = cli("plan", "--params", str(REPO / "params.yaml"), "--device", "tpu")
    assert res.returncode == 2 and res.stderr.startswith("error: --device: 'tpu' has no coefficients")


THROUGHPUT = yaml.safe_load((REPO / "pipelines" / "throughput.yaml").read_text())
"""The stated assumptions behind the times (read, not copied: the file is edited when re-measured)."""


def profile_plan(name: str, device: str) -> tuple[dict, dict[str, dict]]:
    """``lorascope plan`` of a shipped profile on ``device``, before any data is prepared."""
    from lorascope.config import load_params

    params = load_params(profile=str(REPO / "pipelines" / "profiles" / f"{name}.yaml"))
    result = planner.run(params, REPO, device)
    return result, {s["stage"]: s for s in result["stages"]}


def assert_times(result: dict, stages: dict[str, dict], by_hand: dict[str, tuple[int, float]]) -> None:
    """Every stage's devices and time as computed by hand; GPU-hours = time x devices; the total is their
    sum. rel 1e-9: the same arithmetic in another order, never one machine's last digits."""
    assert set(stages) == set(by_hand)
    for name, (devices, seconds) in by_hand.items():
        s = stages[name]
        assert s["devices"] == devices, name
        assert s["seconds"] == pytest.approx(seconds, rel=1e-9), name
        assert s["gpu_hours"] == pytest.approx(seconds * devices / 3600, rel=1e-9), name
    total = sum(devices * seconds / 3600 for devices, seconds in by_hand.values())
    assert result["total_gpu_hours"] == pytest.approx(total, rel=1e-9)


def test_paper_profile_times_and_gpu_hours_by_hand():
    """Each stage of the paper profile on an H200 (the default device), by hand from the profile and the
    throughput file's assumptions: 2 FLOPs per weight per token forward plus causal attention 2 L s H, a
    checkpointed step 6N for the LoRA (frozen base: no weight gradients) and 8N for the full finetune,
    decoding memory-bound (every weight read once per step) unless compute caps it, the store-streaming
    stages per activation (tokens x features)."""
    dev = THROUGHPUT["devices"]["h200"]
    s1k = THROUGHPUT["datasets"]["hub:simplescaling/s1K-1.1"]
    result, stages = profile_plan("qwen2.5-32b-paper", "h200")
    # Qwen2.5-32B: H 5120, M 27648, 64 layers, K = 8 KV heads x 128 = 1024, vocab 152064, untied LM head
    H, M, L, K, V = 5120, 27648, 64, 1024, 152064
    P = 32_763_876_352  # see test_paper_profile_on_an_h100_flags_what_does_not_fit
    n_layer = 2 * H * H + 2 * H * K + 3 * H * M  # q, o; k, v; gate, up, down: the weights a token meets
    assert n_layer == 487_587_840
    head = V * H  # the LM head multiplies every token; the embedding is a lookup
    # s1K-1.1 before `lorascope prepare`: the file's estimate of rows and mean length, cut at the 20k block
    rows, mean = s1k["rows"], min(s1k["mean_tokens"], 20_000)
    tokens, longest = rows * mean, min(s1k["max_tokens"], 20_000)
    assert (
        (result["data"]["tokens"], result["data"]["max_tokens"]) == (tokens, longest) == (9_000_000, 20_000)
    )
    bf16, fp32 = dev["peak_tflops"]["bfloat16"] * 1e12, dev["peak_tflops"]["float32"] * 1e12
    mfu = dev["mfu"]
    # 448 components (rank 1 x 7 projections x 64 layers), 60 MLP neurons per layer, SAE 8 x 448 wide
    lora_cols, mlp_cols, sae_cols = 7 * 64, 64 * 60, 8 * 7 * 64

    # finetune: 8 FSDP processes (pipelines/accelerate/fsdp.yaml) in bf16 (precision auto on a GPU), 5 epochs
    forward = 2 * (L * n_layer + head) + 2 * L * mean * H  # per token, attention at the mean length
    ft_lora = (
        5 * tokens * (forward + forward + forward) / (8 * bf16 * mfu["finetune_lora"])
    )  # fwd, recomputed, bwd
    ft_full = (
        5 * tokens * (forward + forward + 2 * forward) / (8 * bf16 * mfu["finetune_full"])
    )  # + weight grads
    # extract: `--num_processes 8`, one bf16 forward through the layers (the store needs no logits)
    extract = tokens * (2 * L * n_layer + 2 * L * mean * H) / (8 * bf16 * mfu["extract"])
    # sae: d_in 448 x d_sae 3584 is the benchmark's shape, so the benchmark's tokens/s as it is, 1 epoch; the
    # splice KL: 16 held-out sequences x 3 forwards (LoRA, spliced, base) of the longest sequence in bf16 over
    # the weights a token meets, the LM head included
    sae = 1 * tokens / (dev["sae_tokens_per_s"] * (448 * 3584) / (lora_cols * sae_cols))
    sae += 16 * 3 * longest * 2 * (L * n_layer + head) / (bf16 * mfu["forward"])
    # contexts and the categorize density pass: activations (tokens x features) at the file's rates
    contexts = {src: tokens * cols / dev["contexts_activations_per_s"]
                for src, cols in (("lora", lora_cols), ("mlp", mlp_cols), ("sae", sae_cols))}  # fmt: skip
    categorize = 100_000 * (lora_cols + mlp_cols + sae_cols) / dev["density_activations_per_s"]
    # ablate: 16 sequences of 2,048 tokens, bf16; with prefix reuse ablating at layer l re-runs layers l..63:
    # 7 components per layer, each of the 64 layers, 7 types and 3 groups (attn, mlp, all) from layer 0
    layer_runs = 7 * (64 * 65 // 2) + 64 * 65 // 2 + 7 * 64 + 3 * 64
    assert layer_runs == 17_280
    ablate = 16 * layer_runs * 2048 * 2 * (n_layer + 2048 * H) / (bf16 * mfu["ablate"])
    # steer: 1 direction x 7 alphas x 64 math500 prompts x (4,096 thinking + 1,024 answer) tokens, batches of 16 in bf16: a step reads
    # the 2P weight bytes (memory-bound: 16 sequences' 2 x P FLOPs take less)
    step_memory = 2 * P / (dev["hbm_tb_s"] * 1e12 * dev["bandwidth_efficiency"])
    step_compute = 16 * 2 * P / (bf16 * mfu["forward"])
    assert step_memory > step_compute
    steer = 1 * 7 * 64 * (4096 + 1024) / (16 / step_memory)
    # attribute: 16 sequences of 2,048 tokens in bf16; the screen's 1 + 2 x 8 groups x 2 steps passes, each
    # forward + backward (3 forwards); exact: the unablated pass and 2 x 32 (top, control) + 1 named + 448
    # components of the 448 + 3,584 units; generation: the adapter, 16 top units and 1 named unit on Table 1's
    # 728 questions x (32,000 + 768) tokens x the fill, memory-bound decoding in batches of 16
    seq = 16 * 2048 * (2 * (L * n_layer + head) + 2 * L * 2048 * H)
    attribute = (33 * 3 + 1 + 513) * seq / (bf16 * mfu["ablate"])
    attribute += 18 * 728 * (32_000 + 768) * THROUGHPUT["generation_fill"] / (16 / step_memory)
    # evaluate: 30 + 500 + 198 questions x 32,768 tokens x the fill 0.5, float32 over 8 GPUs (vLLM tensor
    # parallel), decode batch 64: 64 sequences' 2 x P FLOPs at the float32 peak outlast reading 4P bytes
    generated = (30 + 500 + 198) * 32_768 * THROUGHPUT["generation_fill"]
    step_memory = 4 * P / (8 * dev["hbm_tb_s"] * 1e12 * dev["bandwidth_efficiency"])
    step_compute = 64 * 2 * P / (8 * fp32 * mfu["forward"])
    assert step_compute > step_memory
    evaluate = generated / (64 / step_compute)

    variants = ["base", "lora", "full", "lora-attn-ablated", "lora-mlp-ablated"]
    assert_times(result, stages, {
        "finetune@lora": (8, ft_lora), "finetune@full": (8, ft_full),
        "extract@lora": (8, extract), "extract@mlp": (8, extract), "sae": (1, sae),
        **{f"contexts@{src}": (1, t) for src, t in contexts.items()}, "categorize": (1, categorize),
        "ablate": (1, ablate), "ablate-export": (1, 0.0), "steer": (1, steer), "attribute": (1, attribute),
        **{f"evaluate@{v}": (8, evaluate) for v in variants},
    })  # fmt: skip


def test_tiny_profile_times_and_gpu_hours_by_hand():
    """Each stage of the tiny profile (as shipped, not the plumbing tests' variant) on the 2-core CPU it is
    made for, by hand from the profile and the measured CPU coefficients, before `lorascope prepare`."""
    dev = THROUGHPUT["devices"]["cpu"]
    synthetic = THROUGHPUT["datasets"]["synthetic"]
    result, stages = profile_plan("tiny", "cpu")
    # base.tiny: H 64, M 128, 2 layers, 2 heads of 32 with 2 KV heads (K = 64), vocab 2048, tied embeddings
    H, M, L, K, V = 64, 128, 2, 64, 2048
    n_layer = 2 * H * H + 2 * H * K + 3 * H * M  # q, o; k, v; gate, up, down
    assert n_layer == 40_960
    P = V * H + L * (n_layer + (H + 2 * K) + 2 * H) + H  # + q/k/v biases, two norms; the final norm
    assert result["architecture"]["params"] == P == 213_696
    head = V * H  # tied, but the head still multiplies every token
    # the 256 training rows at the generator's typical length, under the 512 block
    rows, mean = 256, min(synthetic["mean_tokens"], 512)
    tokens, longest = rows * mean, min(synthetic["max_tokens"], 512)
    assert (result["data"]["tokens"], result["data"]["max_tokens"]) == (tokens, longest) == (74_240, 420)
    fp32 = dev["peak_tflops"]["float32"] * 1e12  # every stage in float32: precision auto is float32 on a CPU
    mfu = dev["mfu"]
    lora_cols, mlp_cols, sae_cols = 7 * 2, 2 * 16, 4 * 7 * 2  # rank 1 x 7 x 2 layers; 16 neurons; expansion 4

    # finetune: one process, no gradient checkpointing (no recomputed forward), 4 epochs
    forward = 2 * (L * n_layer + head) + 2 * L * mean * H
    ft_lora = 4 * tokens * (forward + forward) / fp32 / mfu["finetune_lora"]  # backward: activations only
    ft_full = 4 * tokens * (forward + 2 * forward) / fp32 / mfu["finetune_full"]  # and the weight gradients
    extract = tokens * (2 * L * n_layer + 2 * L * mean * H) / (fp32 * mfu["extract"])
    # sae: the benchmark's tokens/s scaled from its 448 x 3584 to 14 x 56, 4 epochs; the splice KL: 4 sequences
    # x 3 forwards of the longest sequence over the weights a token meets (the tied head multiplies it too)
    sae = 4 * tokens / (dev["sae_tokens_per_s"] * (448 * 3584) / (lora_cols * sae_cols))
    sae += 4 * 3 * longest * 2 * (L * n_layer + head) / (fp32 * mfu["forward"])
    contexts = {src: tokens * cols / dev["contexts_activations_per_s"]
                for src, cols in (("lora", lora_cols), ("mlp", mlp_cols), ("sae", sae_cols))}  # fmt: skip
    categorize = 20_000 * (lora_cols + mlp_cols + sae_cols) / dev["density_activations_per_s"]
    # ablate: 4 sequences of 256 tokens; layer runs: 7 components x (2 + 1), layers 2 + 1, 7 types x 2,
    # 3 groups x 2
    layer_runs = 7 * 3 + 3 + 7 * 2 + 3 * 2
    ablate = 4 * layer_runs * 256 * 2 * (n_layer + 256 * H) / (fp32 * mfu["ablate"])
    # steer: 1 direction x 5 alphas x 2 tasks x 32 prompts x (96 + 16) tokens, batches of 32: compute-bound on a CPU
    step_memory = 4 * P / (dev["hbm_tb_s"] * 1e12 * dev["bandwidth_efficiency"])
    step_compute = 32 * 2 * P / (fp32 * mfu["forward"])
    assert step_compute > step_memory
    steer = 1 * 5 * 2 * 32 * (96 + 16) / (32 / step_compute)
    # attribute: 4 sequences of 256 tokens; the screen's 1 + 2 x 14 x 4 passes (3 forwards each); exact: the
    # unablated pass and 2 x 8 + 1 named + 14 components; generation: 1 + 3 + 1 on 2 x 64 questions x (96 + 16)
    # tokens x the fill, compute-bound in batches of 64
    seq = 4 * 256 * (2 * (L * n_layer + head) + 2 * L * 256 * H)
    attribute = (113 * 3 + 1 + 31) * seq / (fp32 * mfu["ablate"])
    attribute += (
        5 * 128 * (96 + 16) * THROUGHPUT["generation_fill"] / (64 / (64 * 2 * P / (fp32 * mfu["forward"])))
    )
    # evaluate (hf, batch 64): the profile's own questions (prepare.synthetic.n_eval = 64 per benchmark shape)
    generated = 3 * 64 * 128 * THROUGHPUT["generation_fill"]
    step_compute = 64 * 2 * P / (fp32 * mfu["forward"])
    assert step_compute > step_memory
    evaluate = generated / (64 / step_compute)

    variants = ["base", "lora", "full", "lora-attn-ablated", "lora-mlp-ablated"]
    assert_times(result, stages, {
        "finetune@lora": (1, ft_lora), "finetune@full": (1, ft_full),
        "extract@lora": (1, extract), "extract@mlp": (1, extract), "sae": (1, sae),
        **{f"contexts@{src}": (1, t) for src, t in contexts.items()}, "categorize": (1, categorize),
        "ablate": (1, ablate), "ablate-export": (1, 0.0), "steer": (1, steer), "attribute": (1, attribute),
        **{f"evaluate@{v}": (1, evaluate) for v in variants},
    })  # fmt: skip


def test_evaluate_counts_each_tasks_own_questions(tmp_path: Path):
    """evaluate's question count per task: its local file's rows when the file exists, the synthetic
    generator's n_eval when prepare has yet to write it, the hub benchmark's size for a hub task."""

    from lorascope.config import load_params

    params = load_params(REPO / "params.yaml")  # the tiny profile: local files under data/prepared/eval
    (tmp_path / "data/prepared/eval").mkdir(parents=True)
    rows = "\n".join(json.dumps({"problem": str(i), "answer": "1"}) for i in range(7))
    (tmp_path / "data/prepared/eval/aime.jsonl").write_text(rows + "\n")
    n_eval = params.prepare.synthetic.n_eval
    assert [
        planner._questions(params, t, tmp_path) for t in ("aime24_nofigures", "math500", "gpqa_diamond")
    ] == [7, n_eval, n_eval]
    hub = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"data": {}})})
    assert [
        planner._questions(hub, t, tmp_path) for t in ("aime24_nofigures", "math500", "gpqa_diamond")
    ] == [
        30,
        500,
        198,
    ]
