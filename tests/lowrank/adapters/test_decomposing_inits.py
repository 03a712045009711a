"""PiSSA, OLoRA and LoftQ: decompose the full-precision weight before quantizing; PEFT parity on dense
bases; smaller starting error than plain QLoRA on NF4; exact reloads."""

import copy
import json

import pytest
import torch
from peft_oracle import dequantized_copy, logits, peft_load, peft_model, randomize, tiny_llama

from lowrank import nf4
from lowrank.adapters import AdapterError, load_adapter, load_quantized, save_adapter, save_quantized
from lowrank.models import prepare_model
from lowrank.nn import LinearNF4, LoRALinear

pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TARGETS = ["q_proj", "v_proj", "up_proj"]


def low_rank_plus_noise(out_features=96, in_features=64, rank=4, seed=0) -> torch.Tensor:
    """A weight with a strong rank-4 part (outliers a 4-bit grid handles badly) plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(out_features, rank, generator=gen) @ torch.randn(rank, in_features, generator=gen)
    return low + 0.05 * torch.randn(out_features, in_features, generator=gen)


def with_low_rank_weights(model):
    with torch.no_grad():
        for i, (name, m) in enumerate(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                m.weight.copy_(low_rank_plus_noise(*m.weight.shape, seed=i) * 0.1)
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dense_decomposition_matches_peft(tmp_path, init):
    base = tiny_llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    ours = prepare_model(copy.deepcopy(base), r=4, alpha=8, target_modules=TARGETS, quantize=None, init=init)
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            peft_layer = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(module.lora_A, peft_layer.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(module.lora_B, peft_layer.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                module.base_layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=1e-5, msg=name
            )
    torch.testing.assert_close(logits(ours), logits(base), atol=1e-4, rtol=1e-4)  # the split starts exact
    # after "training", PEFT's file loads to PEFT's outputs on the original base, and ours into PEFT
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(mine), logits(theirs), atol=1e-4, rtol=1e-4)
    save_adapter(mine, tmp_path / "ours")
    back = peft_load(base, tmp_path / "ours")
    torch.testing.assert_close(logits(back), logits(mine), atol=1e-4, rtol=1e-4)


def start_error(layer: LoRALinear, weight: torch.Tensor) -> float:
    approx = layer.base_layer.dequantize(torch.float32) + layer.delta_weight()
    return float(torch.linalg.matrix_norm(weight - approx))


def test_pissa_and_loftq_start_below_plain_qlora_on_nf4(device):
    weight = low_rank_plus_noise().to(device)
    linear = torch.nn.Linear(64, 96, bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    plain = LoRALinear(LinearNF4.from_linear(linear), 8, 16)
    qlora = start_error(plain, weight)
    assert qlora == pytest.approx(float(torch.linalg.matrix_norm(weight - nf4.dequantize(nf4.quantize(weight)))))
    pissa = start_error(LoRALinear.from_dense(linear, 8, 16, init="pissa", quantize="nf4"), weight)
    loftq1 = start_error(LoRALinear.from_dense(linear, 8, 16, init="loftq", quantize="nf4"), weight)
    loftq3 = start_error(LoRALinear.from_dense(linear, 8, 16, init="loftq", quantize="nf4", loftq_iters=3), weight)
    # PiSSA moves the rank-4 outliers into the adapter; LoftQ fits the quantization error and improves per round
    assert pissa < 0.1 * qlora and loftq1 < 0.9 * qlora and loftq3 < 0.97 * loftq1, (qlora, pissa, loftq1, loftq3)
    # the old way (quantize first, then decompose the dequantized weight) is no better than plain QLoRA
    requantized = LoRALinear(LinearNF4.from_linear(linear), 8, 16, init="pissa")
    assert start_error(requantized, weight) > 0.9 * qlora


@pytest.mark.parametrize(
    ("init", "options"), [("pissa", {}), ("olora", {}), ("loftq", dict(loftq_iters=2, blocksize=32))]
)
def test_nf4_decomposed_adapters_reload_exactly(tmp_path, init, options):
    base = with_low_rank_weights(tiny_llama())
    model = prepare_model(copy.deepcopy(base), r=4, alpha=8, target_modules=TARGETS, init=init, **options)
    assert model.model.layers[0].self_attn.q_proj.base_layer.blocksize == options.get("blocksize", 64)
    randomize([p for n, p in model.named_parameters() if "lora_B" in n], seed=2, std=0.01)  # "trained"
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    # on the original dense base: the same decomposition, the same 4-bit residual bytes, the same outputs
    again = load_adapter(copy.deepcopy(base), tmp_path / "adapter", quantize="nf4")
    assert torch.equal(logits(again), expected)
    # or on the saved 4-bit residual base (load_quantized), which already holds the residual
    save_quantized(model, tmp_path / "base")
    assert torch.equal(logits(load_adapter(load_quantized(tmp_path / "base"), tmp_path / "adapter")), expected)


def test_decomposing_init_errors(tmp_path):
    with pytest.raises(ValueError, match="init='loftq' fits the adapter to the quantization error: it needs quantize"):
        prepare_model(tiny_llama(), init="loftq", quantize=None)
    with pytest.raises(ValueError, match="loftq_iters must be a positive int, got 0"):
        prepare_model(tiny_llama(), init="loftq", loftq_iters=0)
    with pytest.raises(ValueError, match="init='pissa' needs r <= min"):
        prepare_model(tiny_llama(), r=40, init="pissa", target_modules=["k_proj"])
    with pytest.raises(ValueError, match="init must be one of"):
        prepare_model(tiny_llama(), init="eva")
    quantized = prepare_model(tiny_llama(), r=2, alpha=2)
    save_quantized(quantized, tmp_path)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj is already 4-bit"):
        prepare_model(load_quantized(tmp_path), init="pissa")


@pytest.mark.parametrize(("quantize", "use_rslora"), [(None, False), (None, True), ("nf4", False)])
def test_pissa_converted_to_a_plain_lora_of_the_original_weight(tmp_path, quantize, use_rslora):
    base = with_low_rank_weights(tiny_llama())
    model = prepare_model(
        copy.deepcopy(base),
        r=4,
        alpha=8,
        target_modules=TARGETS,
        init="pissa",
        quantize=quantize,
        use_rslora=use_rslora,
        rank_pattern={"up_proj": 2},
    )
    randomize([p for n, p in model.named_parameters() if "lora_" in n], seed=3, std=0.05)  # "trained"
    save_adapter(model, tmp_path, convert_to_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    original = base
    if quantize is not None:  # what the 4-bit model's "original" weights are: dequant(Q_residual) + s·B0·A0
        original = dequantized_copy(base)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LoRALinear):
                    initial = module.scale * (module.lora_B_initial @ module.lora_A_initial)
                    dense = module.base_layer.dequantize(torch.float32) + initial
                    original.get_submodule(name).weight.copy_(dense)
    theirs = peft_load(original, tmp_path)  # a plain LoRA on the original weights, no PiSSA split
    assert theirs.base_model.model.model.layers[0].mlp.up_proj.r["default"] == 4
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-4, rtol=1e-4)
    with pytest.raises(AdapterError, match="convert_to_lora=True converts PiSSA/OLoRA adapters"):
        save_adapter(prepare_model(tiny_llama(), r=2, alpha=2), tmp_path / "plain", convert_to_lora=True)
