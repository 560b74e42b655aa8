"""``lorascope plan``: what a profile costs before it runs.

Per stage: the GPU memory one device needs (weights, gradients, optimiser state, activations, under the
profile's launcher: FSDP / ZeRO-3 shard weights, gradients and optimiser state over the processes; a
plain data-parallel launch replicates them), the disk it writes, and an estimated time from the
throughput coefficients in ``pipelines/throughput.yaml``; what does not fit the device is flagged.

The formulas (bytes; ``b`` = bytes of the compute dtype, ``P`` parameters, ``H`` hidden, ``M``
intermediate, ``K`` key/value width, ``L`` layers, ``V`` vocab, ``s`` the longest training sequence):

* training activations per token and layer: ``b (5H + 2K + 4M)`` (layer and MLP inputs, q/k/v, the
  attention output, gate/up/act outputs) plus, for the LoRA, ``b (6H + M)`` for the adapters' inputs;
  with gradient checkpointing only each layer's input is kept (``L s H b``) plus one layer's full set
  while it is recomputed; the loss adds ``s V (b + 8)`` (logits, their float32 copy and gradient);
* FSDP / ZeRO-3 also hold two gathered layers (the current one and the prefetched one): ``2 P_layer b``;
* a full finetune in bf16 keeps bf16 weights, gradients and Adam moments (``8 P`` bytes, as the stage
  trains); in float32 / float16 (fp32 master weights) ``16 P``; the LoRA's own weights are float32
  (``16 p`` with its gradients and Adam moments) over a frozen base of ``P b``;
* the activation store holds ``tokens x components x store dtype bytes`` (+ 4 bytes of token id).

Times are estimates (see the coefficients' ``measured`` flags); GPU-hours = wall time x devices.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorascope import paths
from lorascope.architectures import Architecture
from lorascope.config import Params
from lorascope.errors import LorascopeError

GIB = 1024**3
STORE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTEXT_BLOCK = 32768
"""Tokens the contexts stage scores at once (``contexts.selection.BLOCK_TOKENS``)."""
STEER_PROMPT_TOKENS = 512
"""Prompt length assumed for steering's KV cache (benchmark questions are a few hundred tokens)."""


@dataclass
class Launch:
    """How a stage's command runs: processes and how training state is laid over them."""

    processes: int
    sharding: str
    """``single``, ``ddp`` (replicated), ``fsdp`` or ``zero3`` (sharded)."""

    @property
    def shards(self) -> int:
        return self.processes if self.sharding in ("fsdp", "zero3") else 1


def parse_launcher(launcher: str, root: Path) -> Launch:
    """Processes and sharding from a ``*.launcher`` string (``--num_processes``, an accelerate config)."""
    if launcher.strip() == "lorascope":
        return Launch(1, "single")
    words = [p for w in shlex.split(launcher) for p in (w.split("=", 1) if w.startswith("--") else [w])]

    def option(name: str) -> str | None:
        return words[words.index(name) + 1] if name in words and words.index(name) + 1 < len(words) else None

    config: dict[str, Any] = {}
    if (config_file := option("--config_file")) is not None:
        import yaml

        path = root / config_file
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
    processes = int(option("--num_processes") or 0) or int(config.get("num_processes", 1))
    kind = str(config.get("distributed_type", "MULTI_GPU")).upper()
    sharding = {"FSDP": "fsdp", "DEEPSPEED": "zero3"}.get(kind, "ddp" if processes > 1 else "single")
    return Launch(processes, sharding)


@dataclass
class Device:
    """One device kind's coefficients from ``pipelines/throughput.yaml``."""

    name: str
    memory_gib: float
    peak_tflops: dict[str, float]
    hbm_tb_s: float
    bandwidth_efficiency: float
    decode_batch: int
    mfu: dict[str, float]
    sae_tokens_per_s: float
    contexts_activations_per_s: float
    density_activations_per_s: float
    measured: bool

    def flops_per_s(self, dtype: str, kind: str) -> float:
        return self.peak_tflops[dtype] * 1e12 * self.mfu[kind]


def throughput_path(root: Path) -> Path:
    """``pipelines/throughput.yaml`` of the workspace, else the one beside the package (a checkout)."""
    here = root / "pipelines" / "throughput.yaml"
    return here if here.is_file() else Path(__file__).resolve().parents[2] / "pipelines" / "throughput.yaml"


def load_throughput(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise LorascopeError(f"{path}: throughput coefficients not found")
    return yaml.safe_load(path.read_text())


def device_of(throughput: dict[str, Any], name: str | None) -> Device:
    name = name or throughput["default_device"]
    devices = throughput["devices"]
    if name not in devices:
        raise LorascopeError(f"--device: {name!r} has no coefficients (known: {', '.join(devices)})")
    d = devices[name]
    try:
        return Device(
            name, float(d["memory_gib"]), {k: float(v) for k, v in d["peak_tflops"].items()},
            float(d["hbm_tb_s"]), float(d["bandwidth_efficiency"]), int(d["decode_batch"]),
            {k: float(v) for k, v in d["mfu"].items()}, float(d["sae_tokens_per_s"]),
            float(d["contexts_activations_per_s"]), float(d["density_activations_per_s"]),
            bool(d.get("measured", False)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LorascopeError(f"pipelines/throughput.yaml: devices.{name}: {type(e).__name__}: {e}") from None


@dataclass
class Data:
    """Training-data token statistics."""

    rows: int
    tokens: int
    max_tokens: int
    source: str


def data_stats(params: Params, throughput: dict[str, Any], prepared: Path | None) -> Data:
    """From ``metrics/prepare.json`` when given, else the dataset estimate in the throughput file."""
    block = params.prepare.block_size
    if prepared is not None and prepared.is_file():
        m = json.loads(prepared.read_text())
        return Data(int(m["rows"]), int(m["tokens_total"]), int(m["tokens_max"]), f"{prepared}")
    src = params.prepare.source
    key = "synthetic" if src == "synthetic" else src
    est = throughput.get("datasets", {}).get(key)
    if est is None:
        raise LorascopeError(
            f"prepare.source: no token statistics for {src!r} in pipelines/throughput.yaml (datasets); "
            "run `lorascope prepare` first"
        )
    rows = params.prepare.synthetic.n_train if src == "synthetic" else int(est["rows"])
    mean = min(float(est["mean_tokens"]), block)
    note = "estimated" if est.get("estimated") else "typical"
    return Data(
        rows, int(rows * mean), min(int(est["max_tokens"]), block), f"{note} (pipelines/throughput.yaml)"
    )


@dataclass
class Estimate:
    """One stage's plan: per-device memory (bytes) by part, devices, disk, time."""

    stage: str
    devices: int
    memory: dict[str, float] = field(default_factory=dict)
    disk: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    fits: bool = True

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.devices / 3600


def _dtype(precision: str, device: Device) -> str:
    """A precision key on this device kind: ``auto`` is bfloat16 on a GPU, float32 on the CPU."""
    if precision == "auto":
        return "float32" if device.name == "cpu" else "bfloat16"
    return precision


def train_activation_bytes(arch: Architecture, seq: int, b: int, lora: bool, checkpointing: bool) -> float:
    """Activation bytes of one training sequence of ``seq`` tokens (see the module docstring)."""
    H, M, K, L, V = arch.hidden, arch.intermediate, arch.kv_dim, arch.layers, arch.vocab
    per_layer = b * (5 * H + 2 * K + 4 * M) + (b * (6 * H + M) if lora else 0)
    layers = L * seq * H * b + seq * per_layer if checkpointing else L * seq * per_layer
    return layers + seq * V * (b + 8)


def finetune_flops_per_token(arch: Architecture, lora: bool, checkpointing: bool, seq: float) -> float:
    """Model FLOPs per trained token: 2N forward (+ causal attention 2 L s H), backward 2N for the LoRA's
    frozen base (activation gradients only) or 4N for the full model, + 2N recomputed with checkpointing."""
    n = arch.layers * arch.layer_matmul_params + arch.embedding_params  # the LM head multiplies every token
    forward = 2 * n + 2 * arch.layers * seq * arch.hidden
    backward = forward if lora else 2 * forward
    return forward + backward + (forward if checkpointing else 0)


HUB_QUESTIONS = {"aime24_nofigures": 30, "math500": 500, "gpqa_diamond": 198}
"""Questions of each benchmark on the hub."""


def _questions(params: Params, task: str, root: Path) -> int:
    """Questions ``evaluate`` asks of ``task``: its local file's rows (``evaluate.data``), the synthetic
    generator's ``n_eval`` when that file is one ``prepare`` will write, else the hub benchmark's count."""
    local = params.evaluate.data.get(task)
    if local is None:
        return HUB_QUESTIONS[task]
    path = root / local
    if path.is_file():
        import pandas as pd

        readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".json": pd.read_json}
        return len(readers.get(path.suffix, lambda p: pd.read_json(p, lines=True))(path))
    if params.prepare.source == "synthetic" and Path(local).is_relative_to(paths.PREPARED):
        return params.prepare.synthetic.n_eval
    return HUB_QUESTIONS[task]


@dataclass(frozen=True)
class _Sizes:
    """What the stages' estimates share: the model, the data, the adapter's parameters and components
    (the LoRA store's width), the training sequence lengths, the store's shard and the SAE's size."""

    arch: Architecture
    data: Data
    p_lora: int
    """Parameters of the LoRA adapter."""
    components: int
    """Rank-1 components of the adapter: the LoRA store's columns, the SAE's input width."""
    seq: int
    """The longest training sequence."""
    mean_seq: float
    shard_tokens: int
    """Tokens of one activation-store shard (at most the whole store)."""
    d_sae: int
    sae_params: int


def _sizes(params: Params, arch: Architecture, data: Data) -> _Sizes:
    lora = params.finetune.lora
    adapted_layers = len(lora.layers) if lora.layers is not None else arch.layers
    components = lora.r * len(lora.target_modules) * adapted_layers
    d_sae = params.sae.expansion * components
    return _Sizes(
        arch=arch,
        data=data,
        p_lora=arch.lora_params(lora.r, lora.target_modules, adapted_layers),
        components=components,
        seq=min(data.max_tokens, params.prepare.block_size),
        mean_seq=data.tokens / max(data.rows, 1),
        shard_tokens=min(params.extract.shard_tokens, data.tokens),
        d_sae=d_sae,
        sae_params=2 * components * d_sae + d_sae + components,
    )


def _finetune(params: Params, z: _Sizes, device: Device, root: Path) -> list[Estimate]:
    """Both variants under the finetune launcher: weights, gradients and Adam state (sharded or
    replicated), activations of one micro batch, the trained tokens' FLOPs and the checkpoints on disk."""
    arch, P, p_lora, ft = z.arch, z.arch.params, z.p_lora, params.finetune
    launch = parse_launcher(ft.launcher, root)
    dtype = _dtype(ft.precision, device)
    b = DTYPE_BYTES[dtype]
    out = []
    for variant in ("lora", "full"):
        e = Estimate(f"finetune@{variant}", launch.processes)
        n = launch.shards
        if variant == "lora":
            e.memory["weights"] = P * b / n + 4 * p_lora / n
            e.memory["gradients"] = 4 * p_lora / n
            e.memory["optimizer"] = 8 * p_lora / n
        else:
            w = 2 if dtype == "bfloat16" else 4  # fp16 trains with float32 master weights
            e.memory["weights"] = P * w / n
            e.memory["gradients"] = P * w / n
            e.memory["optimizer"] = 2 * P * w / n
        if launch.shards > 1:
            e.memory["gathered layers"] = 2 * arch.layer_params * b
        e.memory["activations"] = ft.micro_batch_size * train_activation_bytes(
            arch, z.seq, b, variant == "lora", ft.gradient_checkpointing
        )
        steps_tokens = z.data.tokens * ft.epochs
        if ft.max_steps > 0:
            steps_tokens = min(steps_tokens, ft.max_steps * ft.global_batch_size * z.mean_seq)
        flops = steps_tokens * finetune_flops_per_token(
            arch, variant == "lora", ft.gradient_checkpointing, z.mean_seq
        )
        e.seconds = flops / (launch.processes * device.flops_per_s(dtype, f"finetune_{variant}"))
        if variant == "lora":
            e.disk = 4 * p_lora + 2 * (4 * p_lora + 8 * p_lora)  # adapter + 2 checkpoints (weights + Adam)
        else:
            w = 2 if dtype == "bfloat16" else 4
            e.disk = P * w + 2 * (P * w + 2 * P * w)
            e.notes.append("checkpoints (2 kept) are in the disk figure; they are deleted after the run")
        out.append(e)
    return out


def _extract(params: Params, z: _Sizes, device: Device, root: Path) -> list[Estimate]:
    """Both sources: the model, one batch's forward (or the LoRA's merge check, the larger), the store
    on disk and a forward pass over every token."""
    arch, ex = z.arch, params.extract
    H, M, L, V = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    launch = parse_launcher(ex.launcher, root)
    dtype = _dtype(ex.precision, device)
    b = DTYPE_BYTES[dtype]
    out = []
    for source, width in (("lora", z.components), ("mlp", L * ex.mlp_neurons)):
        e = Estimate(f"extract@{source}", launch.processes)
        e.memory["weights"] = arch.params * b + (4 * z.p_lora if source == "lora" else 0)
        batch = ex.batch_tokens
        forward = batch * (4 * H * b + 3 * M * b + 4 * max(H, M)) + batch * width * 4
        check = 0.0
        if source == "lora":  # the merge check: reference logits kept while the merged model runs
            check_tokens = min(ex.merge_check_tokens, z.data.tokens)
            check = check_tokens * V * b + 2 * 256 * V * 8 + min(batch, check_tokens) * (4 * H + 3 * M) * b
        e.memory["activations"] = max(forward, check)
        store = z.data.tokens * (width * STORE_BYTES[ex.dtype] + 4)
        e.disk = store
        flops = z.data.tokens * (2 * L * arch.layer_matmul_params + 2 * L * z.mean_seq * H)
        e.seconds = flops / (launch.processes * device.flops_per_s(dtype, "extract"))
        e.notes.append(f"store {z.data.tokens:,} tokens x {width} columns x {STORE_BYTES[ex.dtype]} B")
        out.append(e)
    return out


def _sae(params: Params, z: _Sizes, device: Device) -> Estimate:
    """The SAE with its gradients and Adam state, a batch (or the splice KL's forward, the larger),
    training time scaled from the reference width, and the splice KL's forwards."""
    arch, s, ex = z.arch, params.sae, params.extract
    H, M, V = arch.hidden, arch.intermediate, arch.vocab
    d_in, d_sae, sae_params = z.components, z.d_sae, z.sae_params
    e = Estimate("sae", 1)
    e.memory["weights"] = 4 * sae_params
    e.memory["gradients"] = 4 * sae_params
    e.memory["optimizer"] = 8 * sae_params
    train = s.batch_size * d_sae * 4 * 3 + z.shard_tokens * d_in * (STORE_BYTES[ex.dtype] + 8)
    kl = 0.0
    if s.kl_sequences:
        kb = DTYPE_BYTES[_dtype(s.precision, device)]
        kl = arch.params * kb + 4 * z.p_lora + z.seq * V * 4 * 3 + z.seq * (4 * H + 3 * M) * kb
    e.memory["activations"] = max(train, kl)
    ref = 448 * 3584
    e.seconds = s.epochs * z.data.tokens / (device.sae_tokens_per_s * ref / (d_in * d_sae))
    e.seconds += (
        s.kl_sequences
        * 3
        * z.seq
        * 2
        * (arch.layers * arch.layer_matmul_params + arch.embedding_params)  # the LM head, tied or not
        / device.flops_per_s(_dtype(s.precision, device), "forward")
    )
    e.disk = 4 * sae_params + 16 * sae_params  # weights + the resumable checkpoint
    return e


def _contexts(params: Params, z: _Sizes, device: Device) -> list[Estimate]:
    """Each source: a shard, a block's features and temporaries, the selection state; time from the
    measured activations per second."""
    c, ex, L = params.contexts, params.extract, z.arch.layers
    kept = c.top_k + c.quantile_bins * c.quantile_samples + c.random_samples
    window = c.window_before + 1 + c.window_after
    out = []
    for source, feats, signs in (
        ("lora", z.components, 2),
        ("mlp", L * ex.mlp_neurons, 2),
        ("sae", z.d_sae, 1),
    ):
        e = Estimate(f"contexts@{source}", 1)
        cols = z.components if source != "mlp" else feats
        block = min(CONTEXT_BLOCK, z.shard_tokens)
        e.memory["shard"] = z.shard_tokens * cols * STORE_BYTES[ex.dtype]
        # a block of 32k tokens in float32, its features (the SAE's latents), a feature chunk's temporaries
        e.memory["activations"] = block * (cols + feats) * 4 + block * min(c.feature_chunk, feats) * 4 * 4
        e.memory["selection state"] = signs * feats * kept * (window * 8 + 16)
        if source == "sae":
            e.memory["weights"] = 4 * z.sae_params
        e.seconds = z.data.tokens * feats / device.contexts_activations_per_s
        e.disk = signs * feats * kept * (window * 16 + 64)  # ids, acts, text and tokens per window
        out.append(e)
    return out


def _categorize(params: Params, z: _Sizes, device: Device) -> Estimate:
    """The Figure 2 density pass over the widest store and the SAE (LLM calls are not timed)."""
    cat, ex, L = params.categorize, params.extract, z.arch.layers
    e = Estimate("categorize", 1)
    density_tokens = min(cat.density_tokens, z.data.tokens)
    widest = max(z.components, L * ex.mlp_neurons)
    e.memory["shard"] = z.shard_tokens * widest * STORE_BYTES[ex.dtype]
    # the first density_tokens of it in float64, with the clamped copies; the SAE's 4k-token blocks
    e.memory["activations"] = max(
        min(density_tokens, z.shard_tokens) * widest * 8 * 3, 4096 * z.d_sae * 4 * 2
    )
    e.memory["weights"] = 4 * z.sae_params
    e.seconds = (
        density_tokens * (z.components + L * ex.mlp_neurons + z.d_sae) / device.density_activations_per_s
    )
    e.notes.append("LLM calls (category generation, one assignment per feature) are not timed")
    return e


def _ablated_layer_runs(params: Params, L: int) -> int:
    """Decoder layers run per sequence over the requested sweeps (prefix reuse: an ablation starting at
    layer ``l`` runs the ``L - l`` layers from there)."""
    a, lora = params.ablate, params.finetune.lora
    per_type = len(lora.target_modules) * lora.r
    layer_runs = 0
    if "components" in a.sweeps:
        layer_runs += per_type * sum(L - layer for layer in range(L))
    if "layers" in a.sweeps:
        layer_runs += sum(L - layer for layer in range(L))
    if "types" in a.sweeps:
        layer_runs += len(lora.target_modules) * L
    if "groups" in a.sweeps:
        layer_runs += (3 + len(a.custom)) * L
    return layer_runs


def _ablate(params: Params, z: _Sizes, device: Device) -> list[Estimate]:
    """The sweeps (the model, the recorded layer inputs, a batch, the reference log-probs) and the
    exports (adapters on disk)."""
    arch, a = z.arch, params.ablate
    H, M, L, V = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    dtype = _dtype(a.precision, device)
    b = DTYPE_BYTES[dtype]
    tokens = min(a.max_tokens, z.seq)
    e = Estimate("ablate", 1)
    e.memory["weights"] = arch.params * b + 4 * z.p_lora
    e.memory["activations"] = (
        L * tokens * H * b  # the recorded layer inputs (prefix reuse)
        + a.batch_size * tokens * (4 * H + 3 * M) * b
        + tokens * V * 4  # log P_lora at every response position
        + a.batch_size * min(a.logit_chunk, tokens) * V * 4 * 2
    )
    flops = a.sequences * (
        _ablated_layer_runs(params, L) * tokens * 2 * (arch.layer_matmul_params + tokens * H)
    )
    e.seconds = flops / device.flops_per_s(dtype, "ablate")
    e.disk = 0.0
    return [e, Estimate("ablate-export", 1, disk=len(a.export) * 4 * z.p_lora)]


def _steer(params: Params, z: _Sizes, device: Device) -> Estimate:
    """The model and a batch's KV cache; time from memory-bound decoding of every generated token."""
    arch, st = z.arch, params.steer
    P, L, K = arch.params, arch.layers, arch.kv_dim
    dtype = _dtype(st.precision, device)
    b = DTYPE_BYTES[dtype]
    e = Estimate("steer", 1)
    e.memory["weights"] = P * b + 4 * z.p_lora
    per_prompt = st.max_new_tokens + st.answer_tokens  # thinking, then the answer
    e.memory["kv cache"] = st.batch_size * (STEER_PROMPT_TOKENS + per_prompt) * L * 2 * K * b
    generated: float = len(st.directions) * len(st.alphas) * len(st.tasks) * st.limit * per_prompt
    e.seconds = generated / _decode_tokens_per_s(P * b, st.batch_size, 1, dtype, device)
    return e


def _attribute(params: Params, z: _Sizes, device: Device, root: Path, generation_fill: float) -> Estimate:
    """The model, the SAE and one sequence's activations kept for the backward; time: the screen's
    forward+backward passes (3 forwards' FLOPs each), the exact forwards (one per measured unit) and the
    generated ablations (memory-bound decoding of the questions, ``generation_fill`` of each budget)."""
    arch, at = z.arch, params.attribute
    H, M, L, V, P = arch.hidden, arch.intermediate, arch.layers, arch.vocab, arch.params
    dtype = _dtype(at.precision, device)
    b = DTYPE_BYTES[dtype]
    tokens = min(at.max_tokens, z.seq)
    e = Estimate("attribute", 1)
    e.memory["weights"] = P * b + 4 * z.p_lora + 4 * z.sae_params
    e.memory["activations"] = L * tokens * (4 * H + 3 * M) * b + at.batch_size * tokens * V * 4
    # a forward over the sequence: every matmul weight a token meets, the LM head, causal attention
    forward = tokens * (2 * (L * arch.layer_matmul_params + V * H) + 2 * L * tokens * H)
    latents = z.d_sae if "latents" in at.units else 0
    screened = (z.components if "components" in at.units else 0) + latents
    passes = 1 + 2 * at.screen_groups * at.screen_steps
    measured = min(screened, 2 * at.exact + len(at.named) + (z.components if at.exact_components else 0))
    flops = at.sequences * (passes * 3 * forward + (1 + measured) * forward)
    questions = sum(
        min(_questions(params, t, root), at.limit or _questions(params, t, root)) for t in at.tasks
    )
    generated = (1 + at.generate + len(at.named)) * questions * (at.max_new_tokens + at.answer_tokens)
    e.seconds = flops / device.flops_per_s(
        dtype, "ablate"
    ) + generated * generation_fill / _decode_tokens_per_s(P * b, at.batch_size, 1, dtype, device)
    e.notes.append(f"screen: {passes} passes per sequence for {screened} units; exact: {measured} units")
    return e


def _evaluate(
    params: Params, z: _Sizes, device: Device, root: Path, generation_fill: float
) -> list[Estimate]:
    """Each variant: the weights (over tensor-parallel devices) and the KV cache (vLLM takes its share of
    the GPU); time from decoding ``generation_fill`` of ``max_gen_toks`` per question and sample."""
    ev, P, L, K = params.evaluate, z.arch.params, z.arch.layers, z.arch.kv_dim
    dtype = "bfloat16" if ev.dtype == "auto" else ev.dtype
    b = DTYPE_BYTES[dtype]
    tp = ev.tensor_parallel_size if ev.backend == "vllm" else 1
    questions = {t: _questions(params, t, root) for t in ev.tasks}
    n_q = sum(min(questions[t], ev.limit or questions[t]) for t in ev.tasks)
    out = []
    for variant in ev.variants:
        e = Estimate(f"evaluate@{variant}", tp)
        e.memory["weights"] = P * b / tp
        if ev.backend == "vllm":
            e.memory["kv cache"] = max(
                0.0, ev.gpu_memory_utilization * (device.memory_gib * GIB) - P * b / tp
            )
            e.notes.append("vLLM takes gpu_memory_utilization of each GPU; the rest of it is KV cache")
        else:
            e.memory["kv cache"] = ev.batch_size * ev.max_gen_toks * L * 2 * K * b
        samples = max(1, getattr(ev, "samples", 0) or 1)
        generated = n_q * samples * ev.max_gen_toks * generation_fill
        batch = device.decode_batch if ev.backend == "vllm" else ev.batch_size
        e.seconds = generated / _decode_tokens_per_s(P * b, batch, tp, dtype, device)
        out.append(e)
    return out


def plan(
    params: Params, arch: Architecture, data: Data, device: Device, root: Path, generation_fill: float = 0.5
) -> list[Estimate]:
    """Every stage of ``params`` on ``device``; ``generation_fill``: generated tokens per evaluate
    question as a share of ``evaluate.max_gen_toks``."""
    z = _sizes(params, arch, data)
    out = [
        *_finetune(params, z, device, root),
        *_extract(params, z, device, root),
        _sae(params, z, device),
        *_contexts(params, z, device),
        _categorize(params, z, device),
        *_ablate(params, z, device),
        _steer(params, z, device),
        _attribute(params, z, device, root, generation_fill),
        *_evaluate(params, z, device, root, generation_fill),
    ]
    mem = device.memory_gib * GIB
    for e in out:
        e.fits = e.total_memory <= mem
        if not e.fits:
            e.notes.insert(0, f"DOES NOT FIT: {e.total_memory / GIB:.1f} GiB > {device.memory_gib} GiB")
    return out


def _decode_tokens_per_s(weight_bytes: float, batch: int, devices: int, dtype: str, device: Device) -> float:
    """Memory-bound decoding: each step reads the weights once for ``batch`` sequences (capped by compute)."""
    step_memory = weight_bytes / (devices * device.hbm_tb_s * 1e12 * device.bandwidth_efficiency)
    step_compute = (
        batch * weight_bytes / DTYPE_BYTES[dtype] * 2 / (devices * device.flops_per_s(dtype, "forward"))
    )
    return batch / max(step_memory, step_compute)


def run(
    params: Params, root: Path, device_name: str | None = None, prepared: Path | None = None
) -> dict[str, Any]:
    """The plan as data: the architecture, data statistics, device and one entry per stage."""
    from lorascope.architectures import resolve

    arch, arch_source = resolve(params, root)
    throughput = load_throughput(throughput_path(root))
    device = device_of(throughput, device_name)
    data = data_stats(params, throughput, prepared)
    stages = plan(params, arch, data, device, root, float(throughput.get("generation_fill", 0.5)))
    return {
        "model": params.base.model,
        "architecture": {**asdict(arch), "params": arch.params, "source": arch_source},
        "data": asdict(data),
        "device": {"name": device.name, "memory_gib": device.memory_gib, "measured": device.measured},
        "stages": [{**asdict(e), "total_memory": e.total_memory, "gpu_hours": e.gpu_hours} for e in stages],
        "total_gpu_hours": sum(e.gpu_hours for e in stages),
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}" if n >= 0.05 * GIB else f"{n / GIB:.3f}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def render(result: dict[str, Any]) -> str:
    """The plan as a text table (memory in GiB per device)."""
    a, d, dev = result["architecture"], result["data"], result["device"]
    lines = [
        f"model {result['model']}: {_count(a['params'])} parameters, hidden {a['hidden']}, intermediate "
        f"{a['intermediate']}, {a['layers']} layers, {a['heads']} heads / {a['kv_heads']} KV heads, vocab "
        f"{a['vocab']} ({a['source']})",
        f"data: {d['rows']:,} rows, {d['tokens']:,} tokens, longest {d['max_tokens']:,} ({d['source']})",
        f"device: {dev['name']}, {dev['memory_gib']} GiB"
        + ("" if dev["measured"] else " (throughput coefficients not measured yet: times are estimates)"),
        "",
    ]
    head = (
        "stage",
        "devs",
        "weights",
        "grads",
        "optim",
        "activ.",
        "other",
        "total GiB",
        "disk",
        "time",
        "GPU-h",
    )
    rows = []
    for s in result["stages"]:
        m = dict(s["memory"])
        parts = [m.pop("weights", 0), m.pop("gradients", 0), m.pop("optimizer", 0), m.pop("activations", 0)]
        other = sum(m.values())
        rows.append(
            (s["stage"], str(s["devices"]), *(_gib(x) for x in parts), _gib(other),
             _gib(s["total_memory"]) + ("" if s["fits"] else " !"), _size(s["disk"]),
             _duration(s["seconds"]), f"{s['gpu_hours']:.2f}")
        )  # fmt: skip
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*head))
    lines += [fmt.format(*r) for r in rows]
    lines.append("")
    lines.append(f"total: {result['total_gpu_hours']:.1f} GPU-hours (per-device memory; ! = does not fit)")
    for s in result["stages"]:
        lines += [f"{s['stage']}: {n}" for n in s["notes"]]
    return "\n".join(lines) + "\n"
