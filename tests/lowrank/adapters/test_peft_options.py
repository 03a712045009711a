"""prepare_model's PEFT options (bias, rank/alpha patterns, exclude_modules, layers_pattern, lm_head targets,
r > min(in, out)) against PEFT on the same tiny models: outputs, gradients, and files both ways."""

import json

import pytest
import torch
from peft_oracle import (
    grads_after_backward,
    logits,
    peft_load,
    peft_model,
    randomize,
    tiny_gpt2,
    tiny_llama,
    trainable,
)

from lowrank.adapters import AdapterConfigError, load_adapter, merge_adapters, save_adapter
from lowrank.models import TargetModulesError, prepare_model
from lowrank.nn import LoRAEmbedding, LoRALinear

pytest.importorskip("peft")
pytestmark = pytest.mark.oracle

# (model, PEFT LoraConfig options); prepare_model takes the same options under lowrank's names
CASES = {
    "bias_all": (tiny_gpt2, dict(target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "bias_lora_only": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], bias="lora_only", fan_in_fan_out=True)),
    "patterns": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
            alpha_pattern={"q_proj": 3, "down_proj": 24},
        ),
    ),
    "exclude_list": (tiny_llama, dict(target_modules="all-linear", exclude_modules=["k_proj", "gate_proj"])),
    "exclude_regex": (tiny_llama, dict(target_modules=["q_proj", "up_proj"], exclude_modules=r".*layers\.0\..*")),
    "layers_pattern": (
        tiny_llama,
        dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "lm_head": (tiny_llama, dict(target_modules=["q_proj", "lm_head"])),
    "r_above_min": (tiny_llama, dict(target_modules=["k_proj", "v_proj"], r=40)),  # k/v are 64 -> 32
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 3})),
    "rslora_patterns": (tiny_llama, dict(target_modules=["q_proj"], use_rslora=True, rank_pattern={"q_proj": 9})),
}


def lowrank_options(peft_options: dict) -> dict:
    names = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    options = {names.get(k, k): v for k, v in peft_options.items() if k != "fan_in_fan_out"}
    options.setdefault("r", 4)
    options.setdefault("alpha", 8)
    return options


def peft_options(options: dict) -> dict:
    return {"r": 4, "lora_alpha": 8, **options}


@pytest.mark.parametrize("case", list(CASES))
def test_option_matches_peft_outputs_gradients_and_files(tmp_path, case):
    make, options = CASES[case]
    base = make()
    theirs = peft_model(base, **peft_options(options))
    if options.get("bias", "none") != "none":  # trained biases must travel with the adapter
        randomize([p for n, p in theirs.named_parameters() if n.endswith(".bias") and p.requires_grad], seed=3)
    theirs.save_pretrained(tmp_path / "peft")

    # PEFT's file -> lowrank: same outputs, same trainable set, same gradients
    ours = load_adapter(make(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    assert (logits(ours) - logits(base)).abs().max() > 1e-3
    assert sorted(trainable(ours)) == sorted(trainable(theirs, peft_names=True))
    ours_grads, their_grads = grads_after_backward(ours), grads_after_backward(theirs, peft_names=True)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # prepare_model with the same options builds the same layers and trainable set as get_peft_model
    fresh = prepare_model(make(), quantize=None, **lowrank_options(options))
    assert sorted(trainable(fresh)) == sorted(trainable(theirs, peft_names=True))
    for name, module in fresh.named_modules():
        if isinstance(module, LoRALinear):
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert module.r == peft_layer.r["default"], name
            assert module.scale == pytest.approx(peft_layer.scaling["default"]), name

    # lowrank's file -> PEFT: same outputs
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["bias"] == options.get("bias", "none")
    back = peft_load(base, tmp_path / "ours")
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=1e-5)
    # and merging gives a plain model with the same outputs
    expected = logits(ours)
    merged = merge_adapters(ours)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_options_on_a_4bit_base_load_peft_adapters(tmp_path):
    base = tiny_llama()
    theirs = peft_model(
        base, r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["o_proj"], rank_pattern={"up_proj": 2}
    )
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path, quantize="nf4")
    adapted = {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and not n.endswith("base_layer")
    }
    assert not any(n.endswith("o_proj") for n in adapted)
    assert ours.model.layers[0].mlp.up_proj.r == 2


def test_exclude_and_pattern_selection_rules():
    model = prepare_model(
        tiny_llama(),
        quantize=None,
        target_modules="all-linear",
        exclude_modules=["q_proj"],
        rank_pattern={"^model.layers.0.self_attn.k_proj": 3, "k_proj": 5},
    )
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert not any(n.endswith("q_proj") for n in lora)
    assert lora["model.layers.0.self_attn.k_proj"].r == 3 and lora["model.layers.1.self_attn.k_proj"].r == 5
    assert lora["model.layers.0.mlp.up_proj"].r == 16  # no pattern: the global r


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(bias="some"), ValueError, r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"),
        (dict(rank_pattern={"q_proj": 0}), ValueError, r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
        (dict(rank_pattern=["q_proj"]), ValueError, "rank_pattern must be a dict"),
        (dict(alpha_pattern={"q_proj": "x"}), ValueError, r"alpha_pattern\['q_proj'\] must be a number"),
        (dict(rank_pattern={"(": 2}), ValueError, r"rank_pattern key '\(' is not a valid regular expression"),
        (dict(exclude_modules="("), TargetModulesError, "exclude_modules='\\(' is not a valid regular expression"),
        (dict(exclude_modules=3), TargetModulesError, "exclude_modules must be None, a regex string or a list"),
        (dict(layers_pattern="layers"), TargetModulesError, "layers_pattern='layers' needs layers_to_transform"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), TargetModulesError, "selects no module"),
        (dict(adapter_name="a.b"), ValueError, "adapter_name must be a non-empty string without '.', got 'a.b'"),
    ],
)
def test_bad_options_name_the_value(options, error, message):
    with pytest.raises(error, match=message):
        prepare_model(tiny_llama(), quantize=None, **options)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_bias", True),
        ("layer_replication", [[0, 1]]),
        ("target_parameters", ["w"]),
        ("use_qalora", True),
        ("init_lora_weights", "corda"),
        ("bias", "weird"),
        ("rank_pattern", {"q_proj": "x"}),
    ],
)
def test_unsupported_peft_fields_are_refused_by_name(tmp_path, field, value):
    peft_model(tiny_llama(), r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterConfigError, match=field):
        load_adapter(tiny_llama(), tmp_path)


def test_embedding_adapter_layout_and_errors():
    model = prepare_model(tiny_llama(), r=4, alpha=8, quantize=None, target_modules=["embed_tokens"])
    layer = model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding)
    assert layer.lora_embedding_A.shape == (4, 96) and layer.lora_embedding_B.shape == (64, 4)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # PEFT's init: A = 0, B ~ N(0, 1)
    with pytest.raises(ValueError, match=r"embedding targets \['model.embed_tokens'\] take plain LoRA only"):
        prepare_model(tiny_llama(), target_modules=["embed_tokens"], use_dora=True)
    with pytest.raises(TypeError, match="plain nn.Embedding"):
        LoRAEmbedding(torch.nn.Linear(2, 2), 2, 2)
