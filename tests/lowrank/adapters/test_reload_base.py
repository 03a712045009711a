"""load_adapter into a fresh model rebuilds the base the adapter was trained on (quantized or not) from
what the adapter's safetensors metadata records."""

import pytest
import torch
from peft_oracle import logits, randomize, tiny_llama

from lowrank import files
from lowrank.adapters import AdapterConfigError, load_adapter, save_adapter
from lowrank.adapters.peft_format import ADAPTER_WEIGHTS
from lowrank.models import prepare_model
from lowrank.nn import LinearNF4

TARGETS = ["q_proj", "v_proj", "up_proj"]


def trained(**base):
    model = prepare_model(tiny_llama(), r=4, alpha=8, target_modules=TARGETS, **base)
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed=3)
    return model.eval()


def four_bit_layers(model) -> dict[str, LinearNF4]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearNF4)}


@pytest.mark.parametrize(
    "base",
    [
        {"quantize": "nf4", "blocksize": 32, "double_quant": False},
        {"quantize": "fp4", "blocksize": 128, "double_quant": True, "compute_dtype": torch.float32},
        {"quantize": None},
    ],
    ids=["nf4-b32", "fp4-b128-dq-fp32", "dense"],
)
def test_fresh_model_gets_the_trained_base_back(tmp_path, base):
    model = trained(**base)
    save_adapter(model, tmp_path)
    again = load_adapter(tiny_llama(), tmp_path).eval()
    mine, theirs = four_bit_layers(again), four_bit_layers(model)
    assert sorted(mine) == sorted(theirs)
    assert bool(mine) == (base["quantize"] is not None)
    for name, layer in theirs.items():
        other = mine[name]
        assert (other.quant_type, other.blocksize, other.double_quant, other.compute_dtype) == (
            layer.quant_type,
            layer.blocksize,
            layer.double_quant,
            layer.compute_dtype,
        ), name
        assert torch.equal(other.weight, layer.weight), name  # the same 4-bit bytes
    # same bytes, same adapter, same kernel path (torch on CPU): the logits are bit-identical
    assert torch.equal(logits(again), logits(model))


def test_explicit_quantize_overrides_the_record(tmp_path):
    model = trained(quantize="nf4", blocksize=32, double_quant=False)
    save_adapter(model, tmp_path)
    dense = load_adapter(tiny_llama(), tmp_path, quantize=None)
    assert not four_bit_layers(dense)
    same_kind = four_bit_layers(load_adapter(tiny_llama(), tmp_path, quantize="nf4"))
    assert {(m.blocksize, m.double_quant) for m in same_kind.values()} == {(32, False)}  # recorded settings kept
    with pytest.raises(AdapterConfigError, match="quantize must be 'auto', 'nf4', 'fp4' or None, got 'int8'"):
        load_adapter(tiny_llama(), tmp_path, quantize="int8")


def test_adapter_without_a_record_gets_a_dense_base(tmp_path):
    model = trained(quantize="nf4")
    save_adapter(model, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    tensors = files.read_safetensors(path)
    files.write_safetensors(path, tensors, {"format": "pt"})  # as PEFT writes it: no lowrank metadata
    assert not four_bit_layers(load_adapter(tiny_llama(), tmp_path))


def test_unreadable_record_is_a_clear_error(tmp_path):
    save_adapter(trained(quantize="nf4"), tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    files.write_safetensors(path, files.read_safetensors(path), {"lowrank": "adapter", "lowrank_quantize": "int3"})
    with pytest.raises(AdapterConfigError, match="lowrank_quantize='int3'.*expected nf4, fp4 or none"):
        load_adapter(tiny_llama(), tmp_path)
