"""``LoRALinear`` / ``LoRAFusedProjections``: PEFT parity (on a bitsandbytes 4-bit base and on a dense base),
initializations, merge/unmerge, training leaves the 4-bit bytes alone, torch.compile, errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_torch_error as within_rule

from lowrank import nf4
from lowrank.nn import LinearNF4, LoRAFusedProjections, LoRALinear

K_IN, N_OUT, RANK, ALPHA = 96, 40, 6, 12.0


def dense_base(k=K_IN, n=N_OUT, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(4.0)
    return lin.to(dtype)


def nf4_base(k=K_IN, n=N_OUT, seed=0, **kwargs):
    return LinearNF4.from_linear(dense_base(k, n, seed), **kwargs)


def randomize_adapters(layer: LoRALinear, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.1)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    return layer


class Wrapper(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


# ---------------------------------------------------------------------------------------------------
# PEFT parity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_on_bitsandbytes_linear4bit(compute_dtype, use_rslora):
    peft = pytest.importorskip("peft")
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    k, n = 128, 48  # K block-aligned: bnb's AVX-512 CPU dequant is wrong otherwise (docs/nf4.md, CPU quirk 3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = bnb_nn.Linear4bit(
            k, n, bias=True, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True
        )
        base.weight = bnb_nn.Params4bit(
            (torch.randn(n, k) * 0.2).to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        base = base.to("cpu")
    sd = {key: v.clone() for key, v in base.state_dict().items()}  # before any bnb forward (docs/nf4.md, CPU quirk 5)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False, use_rslora=use_rslora
    )
    model = peft.get_peft_model(Wrapper(base), config)
    model.train()
    peft_layer = model.base_model.model.proj
    ours = LoRALinear(
        LinearNF4.from_bnb_state_dict(sd, compute_dtype=compute_dtype), RANK, ALPHA, use_rslora=use_rslora
    )
    assert ours.scale == pytest.approx(peft_layer.scaling["default"])
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    with torch.no_grad():
        ours.lora_A.copy_(pa)
        ours.lora_B.copy_(pb)
    x = torch.randn(2, 9, k).to(compute_dtype)
    g = torch.randn(2, 9, n).to(compute_dtype)
    x_peft, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_peft = model(x_peft)
    y_ours = ours(x_ours)
    (y_peft * g).sum().backward()
    (y_ours * g).sum().backward()
    # fp64 reference from the same dequantized weight and adapters
    dense = ours.base_layer.dequantize(torch.float32).double()
    x64 = x.double().requires_grad_(True)
    A64, B64 = pa.detach().double().requires_grad_(True), pb.detach().double().requires_grad_(True)
    y64 = F.linear(x64, dense, ours.bias.double()) + ours.scale * F.linear(F.linear(x64, A64), B64)
    (y64 * g.double()).sum().backward()
    assert y_ours.dtype == y_peft.dtype == compute_dtype
    for what, o, p, r in [
        ("y", y_ours, y_peft, y64),
        ("dx", x_ours.grad, x_peft.grad, x64.grad),
        ("dA", ours.lora_A.grad, pa.grad, A64.grad),
        ("dB", ours.lora_B.grad, pb.grad, B64.grad),
    ]:
        within_rule(o, p, r, compute_dtype, what)


def test_default_and_gaussian_init_follow_peft():
    layer = LoRALinear(dense_base(), RANK, ALPHA)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(K_IN)  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert layer.lora_A.abs().max().item() <= bound and layer.lora_A.abs().max().item() > 0.8 * bound
    big = LoRALinear(dense_base(512, 512), 64, 16, init="gaussian")
    assert torch.count_nonzero(big.lora_B) == 0
    assert big.lora_A.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert layer.lora_A.dtype == torch.float32 and layer.scale == ALPHA / RANK
    assert LoRALinear(dense_base(), 4, 8, use_rslora=True).scale == 8 / 2


@pytest.mark.oracle
def test_pissa_init_matches_peft_on_a_dense_base():
    peft = pytest.importorskip("peft")
    lin = dense_base()
    model = peft.get_peft_model(
        Wrapper(copy.deepcopy(lin)),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="pissa"),
    )
    peft_layer = model.base_model.model.proj
    ours = LoRALinear(copy.deepcopy(lin), RANK, ALPHA, init="pissa")
    torch.testing.assert_close(ours.lora_A, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora_B, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.base_layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, K_IN)
    torch.testing.assert_close(ours(x), lin(x), rtol=1e-4, atol=1e-4)  # PiSSA leaves the function unchanged


def test_pissa_on_nf4_base_requantizes_the_residual():
    lin = dense_base()
    base = LinearNF4.from_linear(lin)
    original = base.dequantize(torch.float32)
    layer = LoRALinear(base, RANK, ALPHA, init="pissa")
    residual = original - layer.delta_weight()
    expected = nf4.quantize(residual, 64, True, "nf4", backend="torch")
    assert torch.equal(layer.base_layer.weight, expected.packed)
    # The residual is smaller than W, so re-quantizing it loses less than quantizing W did.
    err_pissa = (layer.merged_dense() - original).abs().mean()
    err_plain = (original - lin.weight.detach()).abs().mean()
    assert 0 < err_pissa < err_plain


# ---------------------------------------------------------------------------------------------------
# Forward / dtype rules / dropout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [True, False])
def test_forward_equals_merged_dense_linear(dtype, quantized):
    layer = randomize_adapters(LoRALinear(nf4_base() if quantized else dense_base(), RANK, ALPHA))
    x = torch.randn(3, 5, K_IN).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and layer.lora_A.dtype == torch.float32
    ref = F.linear(x.double(), layer.merged_dense(torch.float64), layer.bias.double())
    same = F.linear(x, layer._base_dense(dtype), layer.bias.to(dtype)) + (
        layer.scale * F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B)
    ).to(dtype)
    within_rule(y, same, ref, dtype, "y")


def test_dropout_only_in_training_and_reproducible():
    layer = randomize_adapters(LoRALinear(nf4_base(), RANK, ALPHA, dropout=0.5))
    x = torch.randn(4, K_IN)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(layer(x), y_eval, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer(x), y1) and not torch.equal(y1, y_eval)


# ---------------------------------------------------------------------------------------------------
# Merge / unmerge
# ---------------------------------------------------------------------------------------------------


def test_merge_unmerge_dense_round_trip():
    layer = randomize_adapters(LoRALinear(dense_base(), RANK, ALPHA))
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, K_IN)
    y = layer(x)
    exact = layer.merged_dense()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merged_dense(), exact, rtol=0, atol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_into_nf4_requantizes_with_warning_and_unmerge_restores_bytes():
    layer = randomize_adapters(LoRALinear(nf4_base(), RANK, ALPHA))
    packed0 = layer.base_layer.weight.clone()
    x = torch.randn(6, K_IN)
    y = layer(x)
    exact = layer.merged_dense()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    expected = nf4.quantize(exact, 64, True, "nf4", backend="torch")
    assert torch.equal(layer.base_layer.weight, expected.packed)
    torch.testing.assert_close(layer.merged_dense(), exact, rtol=0, atol=0)
    merged_y = layer(x)
    torch.testing.assert_close(
        merged_y, F.linear(x, nf4.dequantize(expected, torch.float32), layer.bias), rtol=1e-5, atol=1e-5
    )
    assert (merged_y - y).abs().max() < 0.1 * y.abs().max()  # lossy but close
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, packed0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def test_training_updates_only_adapters_and_leaves_packed_bytes():
    layer = LoRALinear(nf4_base(), RANK, ALPHA, dropout=0.1)
    assert set(layer.adapter_params()) == {"lora_A", "lora_B"}
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    buffers0 = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    opt = torch.optim.AdamW(layer.adapter_params().values(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, K_IN, generator=gen)
    target = torch.randn(32, N_OUT, generator=gen)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in layer.base_layer.state_dict().items():
        assert torch.equal(v, buffers0[k]), k
    assert layer.base_layer.bias.grad is None and layer.base_layer.weight.grad is None


def test_torch_compile_fullgraph_module():
    layer = randomize_adapters(LoRALinear(nf4_base(), RANK, ALPHA, dropout=0.1))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, K_IN, requires_grad=True)
    layer.eval()
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)
    layer.train()
    compiled(x).sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


# ---------------------------------------------------------------------------------------------------
# Fused projections
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_projections_equal_separate_layers(p):
    layers = [
        randomize_adapters(LoRALinear(nf4_base(n=n, seed=i), RANK, ALPHA, dropout=p), seed=i)
        for i, n in enumerate((40, 24, 24))
    ]
    twins = copy.deepcopy(layers)
    fused = LoRAFusedProjections(layers)
    x = torch.randn(2, 5, K_IN)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused.eval() if p == 0 else fused.train()
    if p:
        torch.manual_seed(3)
        seed = int(torch.randint(0, 2**62, ()).item())  # the seed the fused call will draw
        torch.manual_seed(3)
    outs = fused(x1)
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    for i, twin in enumerate(twins):
        if p:
            from lowrank.ops import lora_linear_nf4

            base = twin.base_layer
            y = lora_linear_nf4(
                x2, base.weight_nf4, twin.lora_A, twin.lora_B, twin.scale, base.bias, p, dropout_seed=seed + i
            )
        else:
            y = twin.eval()(x2)
        torch.testing.assert_close(outs[i], y, rtol=1e-5, atol=1e-5)
        (y * (i + 1)).sum().backward()
        torch.testing.assert_close(layers[i].lora_A.grad, twin.lora_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layers[i].lora_B.grad, twin.lora_B.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share in_features"):
        LoRAFusedProjections([LoRALinear(dense_base(), 2, 4), LoRALinear(dense_base(k=64), 2, 4)])


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        LoRALinear(dense_base(), 0, 1.0)
    assert LoRALinear(dense_base(), 41, 1.0).lora_A.shape == (41, 96)  # PEFT allows r > min(in, out)
    with pytest.raises(ValueError, match=r"init='pissa' needs r <= min\(in, out\) = 40"):
        LoRALinear(dense_base(), 41, 1.0, init="pissa")
    with pytest.raises(ValueError, match="init must be one of"):
        LoRALinear(dense_base(), 2, 1.0, init="loftq")
    with pytest.raises(ValueError, match="dropout must be"):
        LoRALinear(dense_base(), 2, 1.0, dropout=1.5)
    with pytest.raises(TypeError, match="nn.Linear or a LinearNF4"):
        LoRALinear(torch.nn.Conv1d(4, 4, 1), 2, 1.0)
    with pytest.raises(TypeError, match="adapter_dtype"):
        LoRALinear(dense_base(), 2, 1.0, adapter_dtype=torch.int8)
    layer = LoRALinear(nf4_base(), 2, 1.0)
    with pytest.raises(ValueError, match="x has 95 features.*expects 96"):
        layer(torch.randn(3, 95))
    dense = LoRALinear(dense_base(), 2, 1.0)
    dense.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        dense(torch.randn(3, K_IN))


def test_state_dict_round_trip():
    layer = randomize_adapters(LoRALinear(nf4_base(), RANK, ALPHA))
    sd = layer.state_dict()
    assert {"lora_A", "lora_B", "base_layer.weight", "base_layer.weight.absmax"} <= set(sd)
    fresh = LoRALinear(nf4_base(seed=5), RANK, ALPHA)
    fresh.load_state_dict(sd)
    x = torch.randn(2, K_IN)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_lora_linear_nf4_compiles_fullgraph_with_automatic_backend():
    torch._dynamo.reset()
    torch.manual_seed(0)
    from lowrank.nn import LinearNF4, LoRALinear

    layer = LoRALinear(LinearNF4.from_linear(torch.nn.Linear(64, 32)), r=4, alpha=8, init="gaussian")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
