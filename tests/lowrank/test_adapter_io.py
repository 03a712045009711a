"""Files: PEFT adapters both ways, merged dense models, bitsandbytes 4-bit checkpoints, bad input."""

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from helpers import dequantized_copy, tiny, tokens
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank.adapters import (
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterShapeError,
    QuantizedCheckpointError,
    load_adapter,
    load_quantized,
    merge_adapters,
    save_adapter,
    save_quantized,
)
from lowrank.models import prepare_model
from lowrank.nn import LinearNF4, LoRALinear

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def peft_from_pretrained(base, directory):
    """PeftModel.from_pretrained, failing on PEFT's silent 'missing adapter keys' warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, directory).eval()
    problems = [
        str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not problems, problems
    return model


@pytest.mark.parametrize(("arch", "quantize"), [("llama", "nf4"), ("gpt2", None), ("bert", "nf4")])
def test_saved_adapter_loads_in_peft_with_same_outputs(tmp_path, arch, quantize):
    original = tiny(arch)
    model = randomize_adapters(prepare_model(copy.deepcopy(original), r=4, alpha=8, quantize=quantize)).eval()
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert config["task_type"] == {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}[arch]
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") for k in keys)

    base = dequantized_copy(original, skip=["classifier"]) if quantize else copy.deepcopy(original)
    base_logits = logits(base)
    theirs = peft_from_pretrained(base, tmp_path)
    ours = logits(model)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter is really applied, not silently dropped
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "targets"),
    [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"]), ("bert", "all-linear")],
)
def test_peft_written_adapter_loads_into_lowrank(tmp_path, arch, targets):
    original = tiny(arch)
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type=task)
    if arch == "gpt2":
        config.fan_in_fan_out = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(original), config).eval()
        if arch == "bert":  # PEFT trains the classifier as a module to save: give it values to carry over
            randomize_adapters(theirs.base_model.model.classifier.modules_to_save, seed=1)
        theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(original), tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    # the same adapter on a 4-bit base equals PEFT on the dequantized base
    quantized = load_adapter(copy.deepcopy(original), tmp_path, quantize="nf4").eval()
    reference = peft_from_pretrained(dequantized_copy(original, skip=["classifier"]), tmp_path)
    torch.testing.assert_close(logits(quantized), logits(reference), atol=1e-5, rtol=1e-5)
    # and into an already prepared model
    prepared = prepare_model(copy.deepcopy(original), r=8, alpha=16, target_modules=targets, quantize=None)
    torch.testing.assert_close(logits(load_adapter(prepared.eval(), tmp_path)), logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_gives_plain_model_and_dense_checkpoint(tmp_path, arch):
    model = randomize_adapters(prepare_model(tiny(arch), r=4, alpha=8)).eval()
    expected = logits(model)
    merged = merge_adapters(model)
    assert not any(isinstance(m, (LoRALinear, LinearNF4)) for m in merged.modules())
    assert not hasattr(merged, "lowrank_config")
    if arch == "gpt2":
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_save_quantized_loads_in_transformers_with_bitsandbytes(tmp_path):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    model = prepare_model(tiny("llama"), r=4, alpha=8).eval()
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    sd = load_file(tmp_path / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in sd)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    # dequantize through bitsandbytes before any no-grad forward (its CPU path repacks the bytes then)
    for name, module in model.named_modules():
        if isinstance(module, LinearNF4):
            theirs = loaded.get_submodule(name.removesuffix(".base_layer")).weight
            dense = bnb_functional.dequantize_4bit(theirs.data, theirs.quant_state)
            assert torch.equal(dense, module.dequantize(torch.float32)), name
    probs = logits(loaded.eval()).softmax(-1)
    torch.testing.assert_close(probs, logits(model).softmax(-1), atol=1e-2, rtol=0)  # bnb's CPU matmul is low-precision
    # lowrank reads its own checkpoint back bit-exactly, without bitsandbytes
    ours = load_quantized(tmp_path)
    assert torch.equal(logits(ours), logits(model))
    assert not any(p.requires_grad for p in ours.parameters())
    adapted = prepare_model(ours, r=2, alpha=2)  # adapters go onto the loaded 4-bit layers
    assert isinstance(adapted.model.layers[0].mlp.up_proj.base_layer, LinearNF4)


def test_load_quantized_reads_a_checkpoint_written_by_transformers(tmp_path):
    pytest.importorskip("bitsandbytes")
    original = tiny("gpt2")
    original.save_pretrained(tmp_path / "dense")
    quant_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=quant_config, device_map="cpu"
    )
    bnb_model.save_pretrained(tmp_path / "bnb")
    ours = load_quantized(tmp_path / "bnb")
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, LinearNF4) and layer._lowrank_from_conv1d
    torch.testing.assert_close(logits(ours), logits(dequantized_copy(original)), atol=1e-4, rtol=1e-4)
    merged = merge_adapters(ours)  # back to a plain GPT-2 with Conv1D layers
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tmp_path):
    model = randomize_adapters(prepare_model(tiny("llama"), r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("r"), r"lacks the required fields \['r'\]"),
        (lambda c: c.pop("peft_type"), "peft_type"),
        (lambda c: c.update(r="8"), "r must be a positive integer"),
        (lambda c: c.update(lora_alpha=None), "lora_alpha must be a number"),
        (lambda c: c.update(target_modules=[]), "target_modules"),
        (lambda c: c.update(peft_type="IA3"), "must be 'LORA'"),
        (lambda c: c.update(use_dora="yes"), "use_dora must be true or false"),
        (lambda c: c.update(lora_dropout=1.5), "lora_dropout"),
    ],
)
def test_bad_adapter_config_fields(saved_adapter, edit, message):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    edit(config)
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterConfigError, match=message):
        load_adapter(tiny("llama"), saved_adapter)


def test_unreadable_files(saved_adapter):
    (saved_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        load_adapter(tiny("llama"), saved_adapter)
    os.remove(saved_adapter / "adapter_config.json")
    with pytest.raises(AdapterConfigError, match="does not exist"):
        load_adapter(tiny("llama"), saved_adapter)


def test_truncated_safetensors(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        load_adapter(tiny("llama"), saved_adapter)


def test_adapter_for_other_base_shapes(saved_adapter):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(
        AdapterShapeError, match=r"up_proj.lora_B: adapter tensor has shape \(128, 4\), the model needs \(96, 4\)"
    ):
        load_adapter(transformers.LlamaForCausalLM(config), saved_adapter)
    prepared = prepare_model(tiny("llama"), r=2, alpha=8, target_modules=["q_proj", "up_proj"])
    with pytest.raises(AdapterShapeError, match="r=2"):
        load_adapter(prepared, saved_adapter)


def test_adapter_with_wrong_keys(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, path)  # the PEFT trap
    with pytest.raises(AdapterShapeError, match="match no LoRA module"):
        load_adapter(tiny("llama"), saved_adapter)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn" not in k}, path)
    with pytest.raises(AdapterShapeError, match=r"lacks tensors for \['model.layers.1.self_attn.q_proj.lora_A'"):
        load_adapter(tiny("llama"), saved_adapter)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = prepare_model(tiny("llama"), r=2, alpha=4)

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "q")
    assert os.listdir(tmp_path / "out") == [] and os.listdir(tmp_path / "q") == []


def test_wrong_model_state_for_files(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_adapter(tiny("llama"), tmp_path)
    with pytest.raises(QuantizedCheckpointError, match="no 4-bit layers"):
        save_quantized(prepare_model(tiny("llama"), quantize=None), tmp_path)
    tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(QuantizedCheckpointError, match="no quantization_config"):
        load_quantized(tmp_path / "dense")
    save_quantized(prepare_model(tiny("llama"), r=2), tmp_path / "q")
    with pytest.raises(QuantizedCheckpointError, match="LlamaConfig but GPT2LMHeadModel needs a GPT2Config"):
        load_quantized(tmp_path / "q", model_class=transformers.GPT2LMHeadModel)


def test_public_names():
    assert lowrank.save_adapter is save_adapter and lowrank.load_quantized is load_quantized
