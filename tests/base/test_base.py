"""The base stage: the tiny Qwen2 + tokenizer, and references to real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorascope import tracking
from lorascope.base.stage import run
from lorascope.errors import LorascopeError
from lorascope.models import load_model, load_tokenizer, source

from tests.conftest import Prepared, run_of, tiny_params


@pytest.fixture(scope="module")
def tiny(prepared: Prepared) -> Path:
    return prepared.root / "models" / "base"


def test_tiny_model_is_a_real_qwen2_of_the_params_shape(tiny: Path, prepared: Prepared):
    from transformers import Qwen2ForCausalLM

    cfg = tiny_params().base.tiny
    model = load_model(tiny)
    assert isinstance(model, Qwen2ForCausalLM)
    assert len(model.model.layers) == cfg.num_hidden_layers
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert layer.mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert layer.self_attn.k_proj.weight.shape == (cfg.num_key_value_heads * head_dim, cfg.hidden_size)
    assert (
        model.config.rope_parameters["rope_theta"] == cfg.rope_theta == 1e6
    )  # the organism's content lookup
    tok = load_tokenizer(tiny)
    ids = tok("So the answer is 42.", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    base_run = tracking.client().get_run(prepared.base_run)
    assert base_run.data.metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert base_run.data.tags["dvc.out.models/base"] == tracking.dvc_md5(tiny)


def test_tiny_tokenizer_behaves_like_qwens(tiny: Path):
    tok = load_tokenizer(tiny)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # Qwen's split regex: numbers are cut into single digits
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    text = "Wait, let me check: 17 × 3 = 51 ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_saved_tokenizer_does_not_record_how_it_was_loaded(tiny: Path, tmp_path: Path):
    """transformers writes ``local_files_only`` (``HF_HUB_OFFLINE``, read when it is imported) into
    tokenizer_config.json: a 1-byte difference that moved models/full's hash between CI and a shell.
    ``save_tokenizer`` drops it, so processes with either setting save the same bytes, which load back the same."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from transformers import AutoTokenizer; from lorascope.models import save_tokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[2] + '/plain')\n"
        "save_tokenizer(tok, sys.argv[2] + '/saved')"
    )
    saved = {}
    for offline in ("1", "0"):
        out = tmp_path / offline
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        subprocess.run([sys.executable, "-c", script, str(tiny), str(out)], env=env, check=True)
        plain = json.loads((out / "plain" / "tokenizer_config.json").read_text())
        assert plain["local_files_only"] is (offline == "1")  # what the helper is for
        saved[offline] = {p.name: p.read_bytes() for p in (out / "saved").iterdir()}
    assert saved["1"] == saved["0"]
    assert "local_files_only" not in json.loads(saved["1"]["tokenizer_config.json"])
    from transformers import AutoTokenizer

    back, original = AutoTokenizer.from_pretrained(tmp_path / "1" / "saved"), load_tokenizer(tiny)
    text = "a=5\nWait, 5+8=13<|im_end|>"
    assert back(text)["input_ids"] == original(text)["input_ids"]
    assert back.chat_template == original.chat_template


def test_same_seed_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run twice with the same params (pretraining included), the stage writes the same directory byte
    for byte (what leaves every later DVC stage cached after a forced re-run); another seed does not."""
    from tests.conftest import make_workspace

    def written(name: str, seed: int) -> str:
        root = make_workspace(tmp_path / name)
        monkeypatch.setenv("LORASCOPE_ROOT", str(root))
        run(tiny_params(base={"seed": seed, "tiny": {"pretrain": {"steps": 3, "batch_size": 4}}}))
        return tracking.dvc_md5(root / "models/base")

    first = written("a", 0)
    assert written("b", 0) == first
    assert written("c", 1) != first


def test_local_model_is_referenced_not_copied(workspace: Path, prepared: Prepared):
    local = prepared.root / "models" / "base"
    run(tiny_params(base={"model": str(local)}))
    out = workspace / "models" / "base"
    assert sorted(p.name for p in out.iterdir()) == ["reference.json"]  # no lineage file in the output
    ref = json.loads((out / "reference.json").read_text())
    import hashlib

    assert ref["kind"] == "local" and ref["model"] == str(local.resolve())
    assert (
        ref["revision"] == "config-sha256:" + hashlib.sha256((local / "config.json").read_bytes()).hexdigest()
    )
    assert ref["parameters"] == tracking.client().get_run(prepared.base_run).data.metrics["parameters"]
    local_run = tracking.client().get_run(run_of(workspace, "models/base"))
    assert local_run.data.metrics["parameters"] == ref["parameters"]
    assert source(out) == (str(local.resolve()), None)
    assert load_tokenizer(out).eos_token == "<|im_end|>"


def test_unreachable_hub_model_is_one_line(workspace: Path):
    with pytest.raises(LorascopeError) as info:
        run(tiny_params(base={"model": "Qwen/Qwen2.5-32B-Instruct"}))
    msg = str(info.value)
    assert msg.startswith(
        "base.model: cannot resolve revision 'main' of hub model 'Qwen/Qwen2.5-32B-Instruct'"
    )
    assert "\n" not in msg and not (workspace / "models" / "base").exists()
    assert list((workspace / "models").glob("*")) == []  # no temp directory left behind


def test_missing_base_dir_is_one_line(tmp_path: Path):
    with pytest.raises(LorascopeError, match="no base model here .*run `lorascope base`"):
        source(tmp_path)
