"""DoRA (use_dora) on dense and NF4 bases against PEFT's DoRA: outputs, every gradient, files both ways;
through the torch, triton (interpreter) and ext backends under the project's tolerance rule."""

import copy
import json

import pytest
import torch
from helpers import check_rule
from peft_oracle import (
    dequantized_copy,
    grads_after_backward,
    logits,
    peft_load,
    peft_model,
    randomize,
    tiny_llama,
    trainable,
)

from lowrank import nf4
from lowrank.adapters import load_adapter, merge_adapters, save_adapter
from lowrank.models import prepare_model
from lowrank.nn import LinearNF4, LoRALinear
from lowrank.nn.lora import LoRAOptionError

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_dora_model_matches_peft(tmp_path, quantize):
    base = tiny_llama()
    theirs_base = dequantized_copy(base) if quantize else base
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    randomize([p for n, p in theirs.named_parameters() if "magnitude" in n], seed=4, std=1.0)
    with torch.no_grad():
        for p in (p for n, p in theirs.named_parameters() if "magnitude" in n):
            p.abs_().add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    theirs = peft_load(theirs_base, tmp_path / "peft", is_trainable=True)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft", quantize=quantize)
    assert ours.lowrank_config.use_dora
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-4)
    assert sorted(trainable(ours)) == sorted(trainable(theirs, peft_names=True))
    mine, reference = grads_after_backward(ours), grads_after_backward(theirs, peft_names=True)
    assert any("lora_magnitude_vector" in n for n in mine)
    for name, grad in mine.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-4, msg=name)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    back = peft_load(theirs_base, tmp_path / "ours")
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=1e-4)
    # merging folds m / ||W + sBA|| into a plain dense weight with the same outputs
    expected = logits(ours)
    torch.testing.assert_close(logits(merge_adapters(ours)), expected, atol=1e-5, rtol=1e-4)


def test_fresh_dora_starts_at_the_base_and_trains_the_magnitude():
    base = tiny_llama()
    model = prepare_model(copy.deepcopy(base), r=4, alpha=8, quantize=None, target_modules=TARGETS, use_dora=True)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=1e-5)  # m = ||W||, B = 0
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=True)
    assert sorted(trainable(model)) == sorted(trainable(theirs, peft_names=True))


def peft_dora_layer(weight, bias, A, B, magnitude, alpha, dtype):
    """PEFT's DoRA Linear on a dense copy of ``weight``, in ``dtype``."""
    holder = torch.nn.Sequential()
    holder.add_module("lin", torch.nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        holder.lin.weight.copy_(weight)
        holder.lin.bias.copy_(bias)
    model = peft_model(holder, r=A.shape[0], lora_alpha=alpha, target_modules=["lin"], use_dora=True)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return model.to(dtype)


def run(module, x, dy):
    """Output, dx and the adapter gradients, on the CPU."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    params = {n.rsplit(".", 2)[0] if ".default" in n else n: p for n, p in module.named_parameters() if p.requires_grad}
    grads = {}
    for name, p in params.items():
        key = next(k for k in ("lora_A", "lora_B", "lora_magnitude_vector") if k in name)
        grads[key] = p.grad.cpu()
    return y.detach().cpu(), x.grad.cpu(), grads


@pytest.mark.parametrize(
    ("backend", "dtype", "quantized"),
    [
        ("torch", torch.float32, True),
        ("torch", torch.float32, False),
        ("triton", torch.float32, True),
        ("triton", torch.float16, True),
        ("ext", torch.float32, True),
        ("ext", torch.bfloat16, True),
    ],
)
def test_dora_layer_tolerance_rule_per_backend(backend, dtype, quantized, device):
    if backend == "ext":
        from lowrank import _ext

        if _ext.load() is None:
            pytest.skip(f"the C++ extension is not built: {_ext.load_error()}")
        if device.type == "cuda" and not _ext.cuda_kernels_built():
            pytest.skip("the C++ extension has no CUDA kernels")
    gen = torch.Generator().manual_seed(0)
    K, N, r, M = 64, 48, 4, 8
    w = torch.randn(N, K, generator=gen) * K**-0.5
    bias = torch.randn(N, generator=gen) * 0.1
    if quantized:
        base = LinearNF4(nf4.quantize(w.to(dtype).to(device)), bias.to(dtype).to(device), compute_dtype=dtype)
        dense = nf4.dequantize(base.weight_nf4, torch.float32).cpu()
    else:
        base = torch.nn.Linear(K, N).to(dtype)
        with torch.no_grad():
            base.weight.copy_(w)
            base.bias.copy_(bias)
        base = base.to(device)
        dense = base.weight.detach().float().cpu()
    layer = LoRALinear(base, r, 8.0, use_dora=True, backend=backend)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, K, generator=gen) * K**-0.5)
        layer.lora_B.copy_(torch.randn(N, r, generator=gen) * 0.3)
        layer.lora_magnitude_vector.copy_(torch.rand(N, generator=gen) + 0.5)
    x = torch.randn(M, K, generator=gen).to(dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    args = (dense, base.bias.detach().float().cpu(), layer.lora_A.detach().cpu(), layer.lora_B.detach().cpu())
    magnitude = layer.lora_magnitude_vector.detach().cpu()
    reference = peft_dora_layer(*args, magnitude, 8.0, torch.float64).to(device)
    low = peft_dora_layer(*args, magnitude, 8.0, dtype).to(device)
    x, dy = x.to(device), dy.to(device)
    ref_y, ref_dx, ref_g = run(reference, x.double(), dy.double())
    low_y, low_dx, low_g = run(low, x, dy)
    y, dx, g = run(layer, x, dy)
    check_rule(f"{backend} y", y, ref_y, low_y, dtype)
    check_rule(f"{backend} dx", dx, ref_dx, low_dx, dtype)
    for key in ("lora_A", "lora_B", "lora_magnitude_vector"):
        check_rule(f"{backend} d{key}", g[key].to(low_g[key].dtype), ref_g[key], low_g[key], dtype)


def test_dora_bad_combinations():
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with init='pissa'"):
        prepare_model(tiny_llama(), use_dora=True, init="pissa")
    layer = prepare_model(tiny_llama(), r=2, alpha=4, use_dora=True).model.layers[0].self_attn.q_proj
    with pytest.raises(LoRAOptionError, match="merge\\(\\) in place is not available for a DoRA layer"):
        layer.merge()


def test_dora_with_dropout_in_training_matches_peft(tmp_path):
    base = tiny_llama()
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.3)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).train()
    theirs.train()
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)  # both draw one dropout mask of the same shape per layer, in the same order
    mine = ours(ids).logits
    torch.manual_seed(7)
    reference = theirs(ids).logits
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)
    ours.eval()
    assert (ours(ids).logits - mine).abs().max() > 1e-4  # dropout really acted in training mode
