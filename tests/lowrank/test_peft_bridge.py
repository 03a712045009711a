"""lowrank.from_peft / to_peft against PEFT models over bitsandbytes Linear4bit and dense bases (oracle)."""

import json
import sys

import pytest
import torch
import transformers
from helpers import tiny, tokens

from lowrank import peft_bridge
from lowrank.config import TrainConfig
from lowrank.nn import LinearNF4, LoRALinear
from lowrank.train import train

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]

ATOL_FP32 = 1e-4  # the tolerance rule's fp32 term; PEFT's fp32 forward is the same-precision reference


MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "bert": transformers.BertForSequenceClassification,
}
LORA = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM", fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-bridge")
    out = {}
    for arch in MODEL_CLASSES:
        # hidden 64, intermediate 128: every in_features % 64 == 0 (bitsandbytes' AVX-512 CPU dequantize
        # misreads other shapes)
        tiny(arch).save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


def make_peft(model_dirs, arch: str, quant: str | None, double_quant: bool = True, use_rslora: bool = False, **extra):
    kwargs = {"dtype": torch.float32}
    if quant is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier"] if arch == "bert" else None,  # a trained head stays dense
        )
        kwargs["device_map"] = "cpu"
    base = MODEL_CLASSES[arch].from_pretrained(model_dirs[arch], **kwargs)
    lora = dict(LORA[arch])
    if quant is not None:
        lora.pop("fan_in_fan_out", None)  # transformers loads GPT-2's Conv1D as Linear4bit (Linear semantics)
    lora.update(extra)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, use_rslora=use_rslora, **lora
    )
    torch.manual_seed(1)
    return peft.get_peft_model(base, config)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def bnb_states(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every bitsandbytes 4-bit layer's serialized state (packed bytes, constants, blob), by module name."""
    return {
        name: {k: v.detach().clone() for k, v in m.state_dict().items()}
        for name, m in model.named_modules()
        if type(m).__module__.startswith("bitsandbytes.")
    }


def assert_same_state(ours: dict, theirs: dict, name: str) -> None:
    assert set(ours) == set(theirs), name
    for key, value in theirs.items():
        if key.startswith("weight.quant_state."):
            blob = lambda t: json.loads(t.numpy().tobytes().decode())  # noqa: E731
            assert blob(ours[key]) == blob(value), f"{name}.{key}"
        else:
            mine = ours[key].reshape(-1).view(torch.uint8) if key == "weight" else ours[key]
            theirs_bytes = value.reshape(-1).view(torch.uint8) if key == "weight" else value
            assert mine.dtype == theirs_bytes.dtype and torch.equal(mine, theirs_bytes), f"{name}.{key}"


def train_data(arch, n=4):
    ids = tokens(n, 8, seed=5).tolist()
    if arch == "bert":
        return [{"input_ids": row, "labels": i % 3} for i, row in enumerate(ids)]
    return [{"input_ids": row, "labels": row} for row in ids]


CASES = [
    ("llama", "nf4", True),
    ("llama", "nf4", False),
    ("llama", "fp4", True),
    ("llama", "fp4", False),
    ("llama", None, False),
    ("gpt2", None, False),
    ("gpt2", "nf4", True),
    ("bert", None, False),
    ("bert", "nf4", True),
]


@pytest.mark.parametrize(("arch", "quant", "double_quant"), CASES)
def test_from_peft_same_bytes_same_outputs_and_training_continues(model_dirs, arch, quant, double_quant):
    pm = make_peft(model_dirs, arch, quant, double_quant, use_rslora=arch == "llama")
    for m in pm.modules():
        # bitsandbytes' eval/no-grad CPU forward on AVX-512-BF16 machines repacks the weight and replaces the
        # double-quantized absmax by bf16 values (lossy; state_dict() then re-quantizes them): keep its
        # canonical layout so that the bytes compared are the ones the model was loaded with.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    states = bnb_states(pm.base_model.model)
    assert bool(states) == (quant is not None)
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    ids = tokens()
    reference = logits(pm, ids)
    adapters = {
        n: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone()) for n, m in peft_layers.items()
    }

    model = peft_bridge.from_peft(pm)

    assert not any(type(m).__module__.startswith(("peft.", "bitsandbytes.")) for m in model.modules())
    for name, state in states.items():
        converted = model.get_submodule(name)
        assert isinstance(converted, LinearNF4), name
        assert_same_state(converted.state_dict(), state, name)
    assert set(model.lowrank_config.target_modules) == set(adapters)
    for name, (A, B) in adapters.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and layer.r == 4 and layer.dropout == 0.1
        assert layer.scale == (8 / 2 if arch == "llama" else 2.0)  # rsLoRA: alpha / sqrt(r)
        assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
        assert layer.is_quantized == (quant is not None)
        assert layer.lora_A.requires_grad and not any(p.requires_grad for p in layer.base_layer.parameters())
        assert getattr(layer, "_lowrank_from_conv1d", False) == (arch == "gpt2" and quant is None)
    if arch == "bert":
        assert model.lowrank_config.modules_to_save == ["classifier"]
        assert all(p.requires_grad for p in model.classifier.parameters())
    ours = logits(model, ids)
    assert (ours - reference).abs().max().item() <= ATOL_FP32

    before = {n: model.get_submodule(n).lora_B.detach().clone() for n in adapters}
    config = TrainConfig(
        task="classification" if arch == "bert" else "generation",
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        schedule="constant",
        progress=False,
        device="cpu",
    )
    result = train(model, train_data(arch), None, config)
    loss = [h["loss"] for h in result.history]
    assert loss[-1] < loss[0], loss
    assert all(not torch.equal(model.get_submodule(n).lora_B, before[n]) for n in adapters)


def test_to_peft_round_trip(model_dirs):
    pm = make_peft(model_dirs, "bert", None)
    ids = tokens()
    model = peft_bridge.from_peft(pm)
    torch.manual_seed(3)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # distinct from anything PEFT initializes
    torch.nn.init.normal_(model.classifier.weight, std=0.2)
    expected = logits(model, ids)
    names = sorted(model.lowrank_config.target_modules)
    adapters = {n: (model.get_submodule(n).lora_A.clone(), model.get_submodule(n).lora_B.clone()) for n in names}

    back = peft_bridge.to_peft(model)
    assert isinstance(back, peft.PeftModelForSequenceClassification)
    assert (logits(back, ids) - expected).abs().max().item() <= ATOL_FP32
    inner = back.base_model.model
    for name, (A, B) in adapters.items():
        assert torch.equal(inner.get_submodule(name).lora_A["default"].weight, A)
        assert torch.equal(inner.get_submodule(name).lora_B["default"].weight, B)

    again = peft_bridge.from_peft(back)
    assert sorted(again.lowrank_config.target_modules) == names
    assert (logits(again, ids) - expected).abs().max().item() <= ATOL_FP32


def test_to_peft_from_a_4bit_model_has_dense_dequantized_bases(model_dirs):
    pm = make_peft(model_dirs, "llama", "nf4")
    model = peft_bridge.from_peft(pm)
    ids = tokens()
    expected = logits(model, ids)
    dequantized = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, LinearNF4)}
    back = peft_bridge.to_peft(model)
    inner = back.base_model.model
    for name, weight in dequantized.items():
        assert torch.equal(inner.get_submodule(name).weight, weight), name
    assert (logits(back, ids) - expected).abs().max().item() <= ATOL_FP32


def test_gpt2_to_peft_keeps_conv1d(model_dirs):
    pm = make_peft(model_dirs, "gpt2", None)
    model = peft_bridge.from_peft(pm)
    ids = tokens()
    expected = logits(model, ids)
    back = peft_bridge.to_peft(model)
    assert back.peft_config["default"].fan_in_fan_out
    layer = back.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, transformers.pytorch_utils.Conv1D)
    assert (logits(back, ids) - expected).abs().max().item() <= ATOL_FP32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(bias="all"), "bias='all'"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_unsupported_lora_options_are_refused_by_name(model_dirs, change, message):
    base = MODEL_CLASSES["llama"].from_pretrained(model_dirs["llama"])
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **change))
    with pytest.raises(peft_bridge.PeftConversionError, match=message):
        peft_bridge.from_peft(pm)
    assert any(type(m).__module__.startswith("peft.") for m in pm.modules())  # nothing was changed


def test_other_tuners_merged_and_several_adapters_are_refused(model_dirs):
    base = MODEL_CLASSES["llama"].from_pretrained(model_dirs["llama"])
    loha = peft.get_peft_model(base, peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(peft_bridge.PeftConversionError, match="peft_type 'LOHA'"):
        peft_bridge.from_peft(loha)
    base = MODEL_CLASSES["llama"].from_pretrained(model_dirs["llama"])
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with pytest.raises(peft_bridge.PeftConversionError, match=r"2 adapters \['default', 'second'\]"):
        peft_bridge.from_peft(pm)
    pm.delete_adapter("second")
    pm.merge_adapter()
    with pytest.raises(peft_bridge.PeftConversionError, match="merged"):
        peft_bridge.from_peft(pm)
    with pytest.raises(peft_bridge.PeftConversionError, match="expects a peft.PeftModel"):
        peft_bridge.from_peft(base)


def test_embedding_lora_is_refused(model_dirs):
    base = MODEL_CLASSES["llama"].from_pretrained(model_dirs["llama"])
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(peft_bridge.PeftConversionError, match="embed_tokens.*embedding"):
        peft_bridge.from_peft(pm)


def test_to_peft_without_peft_names_the_install(model_dirs, monkeypatch):
    pm = make_peft(model_dirs, "llama", None)
    model = peft_bridge.from_peft(pm)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        peft_bridge.to_peft(model)
    assert model.lowrank_config is not None  # nothing was changed


def test_dense_conversion_needs_no_bitsandbytes(model_dirs, monkeypatch):
    pm = make_peft(model_dirs, "gpt2", None)
    ids = tokens()
    reference = logits(pm, ids)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    model = peft_bridge.from_peft(pm)
    assert (logits(model, ids) - reference).abs().max().item() <= ATOL_FP32


def test_converted_model_saves_an_adapter_peft_loads(model_dirs, tmp_path):
    from lowrank.adapters import save_adapter

    pm = make_peft(model_dirs, "bert", "nf4")
    model = peft_bridge.from_peft(pm)
    torch.nn.init.normal_(model.classifier.weight, std=0.2)
    ids = tokens()
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    base = MODEL_CLASSES["bert"].from_pretrained(model_dirs["bert"])
    with torch.no_grad():  # PEFT's dense base: the dequantized weights lowrank holds
        for name, module in model.named_modules():
            if isinstance(module, LinearNF4):
                target = base.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(module.dequantize())
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert (logits(loaded, ids) - expected).abs().max().item() <= ATOL_FP32


def test_rank_pattern_follows_what_lowrank_settings_can_hold(model_dirs):
    import dataclasses

    from lowrank.models import LoRASettings

    base = MODEL_CLASSES["llama"].from_pretrained(model_dirs["llama"])
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False
    )
    pm = peft.get_peft_model(base, config)
    ids = tokens()
    reference = logits(pm, ids)
    if "rank_pattern" not in {f.name for f in dataclasses.fields(LoRASettings)}:
        with pytest.raises(peft_bridge.PeftConversionError, match="rank_pattern"):
            peft_bridge.from_peft(pm)
        return
    model = peft_bridge.from_peft(pm)
    assert model.model.layers[0].self_attn.v_proj.r == 2 and model.model.layers[0].self_attn.q_proj.r == 4
    assert (logits(model, ids) - reference).abs().max().item() <= ATOL_FP32


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_dora_moves_over_when_lowrank_has_it(model_dirs, quant):
    pm = make_peft(model_dirs, "llama", quant, use_dora=True)
    if not peft_bridge._dora_supported():
        with pytest.raises(peft_bridge.PeftConversionError, match="DoRA"):
            peft_bridge.from_peft(pm)
        return
    for m in pm.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():  # a magnitude that is not the initial row norm, so that it matters
        for m in pm.modules():
            if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                m.lora_magnitude_vector["default"].weight.mul_(1.25)
    ids = tokens()
    reference = logits(pm, ids)
    model = peft_bridge.from_peft(pm)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.use_dora and m.lora_magnitude_vector.requires_grad for m in layers)
    assert (logits(model, ids) - reference).abs().max().item() <= ATOL_FP32
    back = peft_bridge.to_peft(model)
    assert back.peft_config["default"].use_dora
    assert (logits(back, ids) - reference).abs().max().item() <= ATOL_FP32
    again = peft_bridge.from_peft(back)
    config = TrainConfig(
        task="generation", max_steps=4, batch_size=4, lr=1e-2, schedule="constant", progress=False, device="cpu"
    )
    loss = [h["loss"] for h in train(again, train_data("llama"), None, config).history]
    assert loss[-1] < loss[0], loss
