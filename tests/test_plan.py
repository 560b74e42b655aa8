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

from conftest import REPO, cli, tiny_params

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
