"""The extraction hooks (``lorascope.extract.recorder``) on a small random Qwen2 built here, against an
independent ``x . A``: each adapted module's real input captured with a plain hook, times ``lora_A`` read
from the adapter's state dict. All three readings (merged, lora_a, mlp), fp32 and bf16, rank 1 and 2, a
subset of targets; in milliseconds, without the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from lorascope.components import lora_components, mlp_components
from lorascope.extract.recorder import Recorder
from lorascope.sections import LORA_TARGETS


def tiny_lora(rank: int, targets: list[str], seed: int = 0, b_std: float = 0.5):  # noqa: ANN201
    """A 2-layer random Qwen2 with a LoRA of ``rank`` on ``targets`` and a random (non-zero) lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    return peft


def independent(peft, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``[B, S, C]``: each component's input (a plain pre-hook) times its lora_A weight, in float64."""
    comps = lora_components(peft)
    base = peft.get_base_model()
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        base.get_submodule(c.module).register_forward_pre_hook(
            lambda _m, args, name=c.module: inputs.__setitem__(name, args[0].detach().double())
        )
        for c in comps
    ]
    with torch.no_grad():
        peft(input_ids=ids)
    for h in handles:
        h.remove()
    from peft import get_peft_model_state_dict

    state = {
        k: v.double() for k, v in get_peft_model_state_dict(peft).items()
    }  # as the adapter file holds it
    cols = [inputs[c.module] @ state[f"base_model.model.{c.module}.lora_A.weight"].T for c in comps]
    return torch.cat(cols, -1)


def record(model, recorder: Recorder, method: str, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad(), recorder.attach(model, method):
        recorder.begin(ids.shape[0], ids.shape[1], "cpu")
        recorder.buffer_BSC.fill_(float("nan"))  # every column must be written
        base.get_decoder()(input_ids=ids, use_cache=False)
    return recorder.buffer_BSC.double()


def merged_recorder(peft, dtype: torch.dtype = torch.float32):  # noqa: ANN001, ANN201
    """The fast path as the extractor builds it: lora_A (float32) kept, the adapter folded in."""
    comps = lora_components(peft)
    base = peft.get_base_model()
    projections = {c.module: base.get_submodule(c.module).lora_A["default"].weight.detach().float().clone()
                   for c in comps}  # fmt: skip
    merged = copy.deepcopy(peft).merge_and_unload().to(dtype)
    return merged, Recorder(comps, projections)


IDS = torch.tensor(
    [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79, 50, 28, 84, 19, 71, 69]]
)


@pytest.mark.parametrize(
    ("rank", "targets"),
    [(1, list(LORA_TARGETS)), (2, list(LORA_TARGETS)), (1, ["k_proj", "v_proj", "up_proj", "down_proj"])],
)
def test_every_reading_is_x_dot_a(rank: int, targets: list[str]) -> None:
    peft = tiny_lora(rank, targets)
    comps = lora_components(peft)
    assert len(comps) == 2 * len(targets) and all(c.width == rank for c in comps)
    want = independent(peft, IDS)
    assert want.shape == (2, IDS.shape[1], 2 * len(targets) * rank) and want.std() > 0.05
    got_lora_a = record(peft, Recorder(comps), "lora_a", IDS)
    assert (got_lora_a - want).abs().max() <= 1e-5
    merged, recorder = merged_recorder(peft)
    got_merged = record(merged, recorder, "merged", IDS)
    assert (got_merged - want).abs().max() <= 1e-4
    # columns are the component order: a rank-r component's r scalars side by side
    col = 0
    for c in comps:
        assert (got_merged[..., col : col + c.width] - want[..., col : col + c.width]).abs().max() <= 1e-4
        col += c.width


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "targets", [list(LORA_TARGETS), ["q_proj", "v_proj", "gate_proj"], ["k_proj", "up_proj"]]
)
def test_reduced_precision_shares_one_product_per_input(dtype: torch.dtype, targets: list[str]) -> None:
    """In bf16 / fp16 the modules reading one tensor (q/k/v, gate/up) are projected together by the group's
    first adapted module: every column still holds its own component's x . A (the model's own rounding of
    its inputs aside), whichever members of a group are adapted."""
    peft = tiny_lora(1, targets)
    merged, recorder = merged_recorder(peft, dtype)
    got = record(merged, recorder, "merged", IDS)
    # the reference: the same reduced-precision merged model's inputs, projected in float64
    inputs: dict[str, torch.Tensor] = {}
    handles = [merged.get_submodule(c.module).register_forward_pre_hook(
        lambda _m, args, name=c.module: inputs.__setitem__(name, args[0].double())) for c in recorder.components]  # fmt: skip
    with torch.no_grad():
        merged(input_ids=IDS)
    for h in handles:
        h.remove()
    want = torch.cat(
        [inputs[c.module] @ recorder.projections[c.module].double().T for c in recorder.components], -1
    )
    assert torch.isfinite(got).all()
    scale = want.abs().amax(dim=(0, 1))
    assert ((got - want).abs().amax(dim=(0, 1)) <= 1e-5 + 1e-5 * scale).all()  # fp32 products of the same x
    assert recorder._shared is None  # cleared when the hooks come off


def test_mlp_reading_is_the_first_neurons_of_down_proj_input() -> None:
    peft = tiny_lora(1, ["q_proj"])
    model = peft.get_base_model()
    comps = mlp_components(model, 5)
    assert [c.width for c in comps] == [5, 5] and comps[1].module == "model.layers.1.mlp.down_proj"
    inputs = {}
    handles = [model.get_submodule(c.module).register_forward_pre_hook(
        lambda _m, args, name=c.module: inputs.__setitem__(name, args[0].double())) for c in comps]  # fmt: skip
    got = record(model, Recorder(comps), "mlp", IDS)
    for h in handles:
        h.remove()
    assert torch.equal(got, torch.cat([inputs[c.module][..., :5] for c in comps], -1))


def test_hooks_come_off_and_unknown_methods_are_refused() -> None:
    peft = tiny_lora(1, ["q_proj", "down_proj"])
    comps = lora_components(peft)
    recorder = Recorder(comps)
    base = peft.get_base_model()
    before = {c.module: len(base.get_submodule(c.module).lora_A["default"]._forward_hooks) for c in comps}
    with recorder.attach(peft, "lora_a"):
        assert all(len(base.get_submodule(c.module).lora_A["default"]._forward_hooks) == before[c.module] + 1
                   for c in comps)  # fmt: skip
    assert {
        c.module: len(base.get_submodule(c.module).lora_A["default"]._forward_hooks) for c in comps
    } == before
    assert recorder.width == 4  # 2 layers x 2 components
    with pytest.raises(ValueError, match="unknown extraction method 'nope'"), recorder.attach(peft, "nope"):
        pass


@pytest.mark.parametrize(
    "targets", [list(LORA_TARGETS), ["q_proj", "v_proj", "gate_proj", "up_proj"], ["k_proj", "up_proj"]]
)
def test_reduced_precision_projects_each_group_once(targets: list[str]) -> None:
    """In bf16 the adapted members of a q/k/v or gate/up group get their columns from one product (the
    first member's), each column written once per forward; other modules each from their own."""
    from lorascope.extract.recorder import SHARED_INPUT

    peft = tiny_lora(1, targets)
    merged, recorder = merged_recorder(peft, torch.bfloat16)
    start = {}
    col = 0
    for c in recorder.components:
        start[c.module] = col
        col += c.width
    writes: list[tuple[int, int]] = []
    alive: list[torch.Tensor] = []  # held, so no product's memory is reused by the next
    write = recorder._write

    def spy(s: int, w: int, values: torch.Tensor) -> None:
        alive.append(values)
        writes.append((s, values.untyped_storage().data_ptr()))
        write(s, w, values)

    recorder._write = spy  # type: ignore[method-assign]
    record(merged, recorder, "merged", IDS)
    assert sorted(s for s, _ in writes) == sorted(start.values())  # each column once
    storage = dict(writes)
    group_of = {k: lead for lead, ks in SHARED_INPUT.items() for k in ks}
    for layer in (0, 1):
        mods = [m for m in start if f"layers.{layer}." in m]
        by_group: dict[str, set[int]] = {}
        for m in mods:
            kind = m.rpartition(".")[2]
            by_group.setdefault(group_of.get(kind, m), set()).add(storage[start[m]])
        assert all(len(ptrs) == 1 for ptrs in by_group.values()), by_group  # one product per group
        assert len(set().union(*by_group.values())) == len(by_group)  # and one per group only
