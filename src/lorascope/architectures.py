"""Architecture numbers of the base models, without the hub: shipped for the models the profiles
name, read from ``config.json`` for a local model directory, built from ``base.tiny`` for ``tiny``.

``lorascope plan`` sizes memory, disk and time from these; nothing here loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError


@dataclass(frozen=True)
class Architecture:
    """A Qwen2-style decoder: what parameter counts and activation sizes depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool = True
    """Qwen2 has biases on q, k and v (and nowhere else)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections' outputs."""
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each adapted projection of one layer, in component order."""
        H, M, K = self.hidden, self.intermediate, self.kv_dim
        return {
            "q_proj": (H, H), "k_proj": (H, K), "v_proj": (H, K), "o_proj": (H, H),
            "gate_proj": (H, M), "up_proj": (H, M), "down_proj": (M, H),
        }  # fmt: skip

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: the seven projections, q/k/v biases and two RMSNorms."""
        weights = sum(i * o for i, o in self.module_shapes().values())
        bias = (self.hidden + 2 * self.kv_dim) if self.qkv_bias else 0
        return weights + bias + 2 * self.hidden

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer that multiply each token (2 FLOPs each per token)."""
        return sum(i * o for i, o in self.module_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters: embedding, layers, final norm and the LM head unless tied."""
        head = 0 if self.tie_embeddings else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    def lora_params(self, rank: int, targets: list[str], layers: int | None = None) -> int:
        """Trainable parameters of a rank-``rank`` LoRA on ``targets`` in ``layers`` layers (default all)."""
        shapes = self.module_shapes()
        per_layer = sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
        return per_layer * (self.layers if layers is None else layers)


SHIPPED: dict[str, Architecture] = {
    # Qwen2.5-0.5B(-Instruct) config.json: hidden_size 896, intermediate_size 4864, 24 layers, 14 heads,
    # 2 key/value heads, vocab_size 151936, tie_word_embeddings true (494M parameters)
    "Qwen/Qwen2.5-0.5B": Architecture(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-0.5B-Instruct": Architecture(896, 4864, 24, 14, 2, 151936, True),
    # Qwen2.5-32B(-Instruct) config.json: hidden_size 5120, intermediate_size 27648, 64 layers, 40 heads,
    # 8 key/value heads, vocab_size 152064, tie_word_embeddings false (32.8B parameters)
    "Qwen/Qwen2.5-32B": Architecture(5120, 27648, 64, 40, 8, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": Architecture(5120, 27648, 64, 40, 8, 152064, False),
}
"""Architecture numbers of the models the shipped profiles use (the hub is not needed to plan)."""


def from_config(path: Path) -> Architecture:
    """A model directory's ``config.json`` (Qwen2 / Llama field names); a bad file is one line."""
    try:
        cfg = json.loads(path.read_text())
        return Architecture(
            hidden=int(cfg["hidden_size"]),
            intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LorascopeError(f"{path}: cannot read the architecture ({type(e).__name__}: {e})") from None


def resolve(params: object, root: Path) -> tuple[Architecture, str]:
    """``(architecture, where it came from)`` for ``params.base``: ``tiny`` from ``base.tiny``, a shipped
    hub id, or a local directory with ``config.json`` (relative to ``root`` or absolute); else a
    one-line error naming ``base.model``."""
    base = params.base  # type: ignore[attr-defined]
    if base.model == "tiny":
        t = base.tiny
        arch = Architecture(
            t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size, t.tie_word_embeddings,
        )  # fmt: skip
        return arch, "base.tiny"
    if base.model in SHIPPED:
        return SHIPPED[base.model], f"shipped numbers for {base.model}"
    local = Path(base.model).expanduser()
    local = local if local.is_absolute() else root / local
    if (local / "config.json").is_file():
        return from_config(local / "config.json"), f"{local / 'config.json'}"
    raise LorascopeError(
        f"base.model: no architecture numbers for {base.model!r} (shipped: {', '.join(sorted(SHIPPED))}; "
        "or point base.model at a local model directory with a config.json)"
    )
