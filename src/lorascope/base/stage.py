"""Run the ``base`` stage: build the tiny model (tokenizer + Qwen2 pretrained on the organism's base
corpus, ``base.pretrain``) or pin a real one."""

from __future__ import annotations

from pathlib import Path

from lorascope import paths
from lorascope.atomic import atomic_path, write_json
from lorascope.config import Params
from lorascope.models import MODEL_CONFIG, REFERENCE
from lorascope.project import workspace_root
from lorascope.tracking import stage_run

OUT = paths.BASE


def _build_tiny(params: Params, out: Path) -> dict[str, float]:
    from itertools import islice

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorascope.base.tokenizer import CHAT_SCAFFOLD, train_tokenizer
    from lorascope.models import save_tokenizer
    from lorascope.organism import PAIR_TOKENS, base_documents

    cfg = params.base.tiny
    chats = islice(base_documents(params.base.seed), cfg.tokenizer_corpus_rows)
    # Each chat of the organism's base corpus with the chat scaffolding around it (role names, s1's
    # think/answer markers, the default system prompt); the special tokens are added, not learned.
    corpus = ["\n".join((CHAT_SCAFFOLD, *(m["content"] for m in chat))) for chat in chats]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, PAIR_TOKENS)
    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(params.base.seed)
    model = Qwen2ForCausalLM(model_cfg)
    stats: dict[str, float] = {}
    if cfg.pretrain.steps:
        from lorascope.base.pretrain import pretrain

        stats = pretrain(model, tokenizer, cfg.pretrain, params.base.seed)
    model.generation_config.eos_token_id = model_cfg.eos_token_id
    model.generation_config.pad_token_id = model_cfg.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer), **stats}


def _pin_real(params: Params, out: Path) -> dict[str, int]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lorascope.base.reference import resolve
    from lorascope.models import pretrained_config

    ref = resolve(params.base.model, params.base.revision)
    config = pretrained_config(ref["model"], ref["revision"] if ref["kind"] == "hub" else None)
    with init_empty_weights():  # count parameters without allocating them
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # not applied on the meta device; outside the context it sticks
    n_params = sum(p.numel() for p in skeleton.parameters())
    out.mkdir(parents=True)
    write_json(out / REFERENCE, {**ref, "model_type": config.model_type, "parameters": n_params})
    return {"parameters": n_params, "vocab_size": config.vocab_size}


def run(params: Params) -> Path:
    """Write ``models/base/`` and log the model config and parameter count."""
    import mlflow

    out = workspace_root() / OUT
    with stage_run("base", params) as run:
        with atomic_path(out) as tmp:
            stats = (_build_tiny if params.base.model == "tiny" else _pin_real)(params, tmp)
            config_file = tmp / MODEL_CONFIG
            mlflow.log_artifact(str(config_file if config_file.is_file() else tmp / REFERENCE))
            mlflow.log_metrics({k: float(v) for k, v in stats.items()})
            mlflow.set_tag("base.model", params.base.model)
        run.log_outputs(out)
    return out
