"""``LinearNF4``: quantization, forward/backward, bitsandbytes-compatible state dict, dtype casts, errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, assert_within_torch_error

from lowrank import nf4
from lowrank.nn import LinearNF4

BNB_KEYS = {
    "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
}  # fmt: skip


def make_linear(k=96, n=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    return lin.to(dtype)


def test_from_linear_quantizes_bit_exactly_and_freezes():
    lin = make_linear()
    layer = LinearNF4.from_linear(lin, blocksize=64, double_quant=True)
    expected = nf4.quantize(lin.weight.detach(), 64, True, "nf4", backend="torch")
    got = layer.weight_nf4
    for name in ("packed", "absmax", "nested_absmax", "nested_offset"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == ((96 * 40) // 2, 1)
    # the uint8 tensors are frozen parameters (FSDP2 shards them, DDP never re-sends them), the tiny fp32
    # nested constants buffers
    params = dict(layer.named_parameters())
    assert list(params) == ["weight", "weight_absmax", "bias"] and not any(p.requires_grad for p in params.values())
    assert params["weight_absmax"].dtype == torch.uint8
    assert {name for name, _ in layer.named_buffers()} == {"weight_nested_absmax", "weight_nested_offset"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 67])
def test_forward_and_input_grad_match_dequantized_linear(dtype, M):
    lin = make_linear()
    layer = LinearNF4.from_linear(lin, backend="torch")
    dense = layer.dequantize(torch.float32)
    x = torch.randn(2, M, 96).to(dtype)
    xs = x.clone().requires_grad_(True)
    y = layer(xs)
    assert y.dtype == dtype and y.shape == (2, M, 40)
    y.sum().backward()
    x64 = x.double().requires_grad_(True)
    ref = F.linear(x64, dense.double(), layer.bias.double())
    ref.sum().backward()
    x_same = x.clone().requires_grad_(True)
    same = F.linear(x_same, dense.to(dtype), layer.bias.to(dtype))
    same.sum().backward()
    for ours, s, r in ((y, same, ref), (xs.grad, x_same.grad, x64.grad)):
        assert_within_torch_error(ours, s, r, dtype)


def test_compute_dtype_runs_the_matmul_in_it_and_returns_input_dtype():
    layer = LinearNF4.from_linear(make_linear(), compute_dtype=torch.bfloat16, backend="torch")
    x = torch.randn(5, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_backward_keeps_no_dense_weight_and_never_grads_it():
    layer = LinearNF4.from_linear(make_linear(), backend="torch")
    x = torch.randn(67, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert not any(t.dtype.is_floating_point and t.shape == (40, 96) for t in saved)
    assert x.grad is not None and layer.weight.grad is None


def test_state_dict_keys_are_bitsandbytes_and_round_trip(tmp_path):
    from safetensors import torch as safetensors

    layer = LinearNF4.from_linear(make_linear())
    sd = layer.state_dict()
    assert set(sd) == BNB_KEYS
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
    assert blob["shape"] == [40, 96] and blob["blocksize"] == 64 and blob["quant_type"] == "nf4"
    path = tmp_path / "layer.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = safetensors.load_file(str(path))
    fresh = LinearNF4.from_linear(make_linear(seed=1), double_quant=False)
    fresh.load_state_dict(loaded)
    assert fresh.double_quant and torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.bias, layer.bias)
    again = LinearNF4.from_bnb_state_dict(loaded)
    x = torch.randn(3, 96)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_load_state_dict_errors_name_the_key():
    layer = LinearNF4.from_linear(make_linear())
    sd = layer.state_dict()
    missing = {k: v for k, v in sd.items() if k != "weight.absmax"}
    with pytest.raises(RuntimeError, match="weight.absmax"):
        LinearNF4.from_linear(make_linear()).load_state_dict(missing)
    other = LinearNF4.from_linear(make_linear(k=128)).state_dict()
    with pytest.raises(RuntimeError, match=r"does not match \(40, 96\)"):
        LinearNF4.from_linear(make_linear()).load_state_dict(other)
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.extra"):
        LinearNF4.from_linear(make_linear()).load_state_dict({**sd, "weight.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        LinearNF4.from_linear(make_linear()).load_state_dict({k: v for k, v in sd.items() if k != "bias"})


def test_dtype_casts_keep_quantization_constants_fp32():
    for double_quant in (True, False):
        layer = LinearNF4.from_linear(make_linear(), double_quant=double_quant)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.to(torch.bfloat16)
        assert layer.weight_nf4 is not None  # validates dtypes
        if double_quant:
            assert (
                layer.weight_nested_absmax.dtype == torch.float32 and layer.weight_nested_offset.dtype == torch.float32
            )
        else:  # fp32 block constants are held as their bytes
            assert layer.weight_absmax.dtype == torch.uint8 and layer.weight_nf4.absmax.dtype == torch.float32
        after = layer.state_dict()
        for key in before:
            if key != "bias":
                assert torch.equal(after[key], before[key]), key
        assert layer.bias.dtype == torch.bfloat16
        assert layer(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_deepcopy_and_meta_free_construction_errors():
    layer = LinearNF4.from_linear(make_linear())
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.weight, layer.weight) and twin.weight.data_ptr() != layer.weight.data_ptr()
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearNF4.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="NF4Weight"):
        LinearNF4(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        LinearNF4(nf4.quantize(torch.randn(4, 4, 4)))
    with pytest.raises(ValueError, match="bias must have shape"):
        LinearNF4(nf4.quantize(torch.randn(8, 64)), torch.zeros(7))
    with pytest.raises(ValueError, match="expects 96"):
        layer(torch.randn(2, 95))


# ---------------------------------------------------------------------------------------------------
# bitsandbytes Linear4bit as the oracle (test-only dependency)
# ---------------------------------------------------------------------------------------------------


def make_bnb(k, n, compute_dtype, seed=0):
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = bnb_nn.Linear4bit(
            k, n, bias=True, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True
        )
        layer.weight = bnb_nn.Params4bit(
            w.to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        with torch.no_grad():
            layer.bias.copy_(torch.randn(n))
        layer = layer.to("cpu")  # quantizes
    # Capture the state before any forward: bnb's CPU inference repacks the weight in place (docs/nf4.md, CPU quirk 5).
    return layer, {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.oracle
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_matches_bitsandbytes_linear4bit(compute_dtype):
    # K a multiple of the blocksize: bnb's AVX-512 CPU dequant is wrong when rows are not block-aligned.
    layer, sd = make_bnb(128, 48, compute_dtype)
    ours = LinearNF4.from_bnb_state_dict(sd, compute_dtype=compute_dtype, backend="torch")
    assert set(ours.state_dict()) == set(sd) == BNB_KEYS
    for key, value in ours.state_dict().items():
        assert torch.equal(value, sd[key]), key
    x = torch.randn(5, 128).to(compute_dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_bnb = layer(x1)
    y = ours(x2)
    torch.testing.assert_close(y, y_bnb, rtol=0, atol=ATOL[compute_dtype] / 10)
    y_bnb.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=ATOL[compute_dtype] / 10)


def _same_layer(a: LinearNF4, b: LinearNF4) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    x = torch.randn(5, a.in_features, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a(x), b(x))


def test_copy_deepcopy_pickle_and_weights_only_state_dicts():
    import copy
    import io

    layer = LinearNF4.from_linear(make_linear())
    deep = copy.deepcopy(layer)
    assert deep.weight.data_ptr() != layer.weight.data_ptr()
    _same_layer(layer, deep)
    _same_layer(layer, copy.copy(layer))
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module (pickled)
    buffer.seek(0)
    _same_layer(layer, torch.load(buffer, weights_only=False))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)  # tensors only: loadable with weights_only=True
    buffer.seek(0)
    fresh = LinearNF4.from_linear(make_linear(seed=7))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _same_layer(layer, fresh)


def test_quant_state_blob_is_bitsandbytes_bytes_and_pickles_as_a_plain_tensor(tmp_path):
    import io

    from safetensors.torch import load_file, save_file

    from lowrank.nn.linear_nf4 import QuantStateBlob

    layer = LinearNF4.from_linear(make_linear())
    key = "weight.quant_state.bitsandbytes__nf4"
    blob = layer.state_dict()[key]
    plain = layer.weight_nf4.to_bnb_state_dict()[key]  # the format module's bytes, as bitsandbytes writes them
    assert isinstance(blob, QuantStateBlob) and type(plain) is torch.Tensor and torch.equal(blob, plain)
    assert json.loads(bytes(blob.numpy()).decode())["nested_offset"] == layer.weight_nested_offset.item()
    buffer = io.BytesIO()
    torch.save({key: blob}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)[key]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, plain)
    copied = copy.deepcopy(blob)
    assert isinstance(copied, QuantStateBlob) and torch.equal(copied, plain) and copied.data_ptr() != blob.data_ptr()
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "layer.safetensors"))[key], plain)


def test_meta_skeleton_then_load():
    layer = LinearNF4.from_linear(make_linear(), blocksize=128)
    sd = layer.state_dict()
    for double_quant in (True, False):
        source = LinearNF4.from_linear(make_linear(), blocksize=128, double_quant=double_quant)
        with torch.device("meta"):
            meta_linear = torch.nn.Linear(96, 40)
        skeleton = LinearNF4.from_linear(meta_linear, blocksize=128, double_quant=double_quant)
        assert skeleton.weight.is_meta and skeleton.weight.shape == source.weight.shape
        skeleton.load_state_dict(source.state_dict(), assign=True)  # meta -> the state dict's tensors
        _same_layer(source, skeleton)
        empty = LinearNF4.empty(40, 96, True, blocksize=128, double_quant=double_quant, device="meta")
        empty.to_empty(device="cpu")
        empty.load_state_dict(source.state_dict())
        _same_layer(source, empty)
    assert sd  # the first layer's state dict was not consumed


def test_dtype_casts_of_a_prepared_model_leave_the_4bit_base_alone():
    model = torch.nn.Sequential(LinearNF4.from_linear(make_linear()), LinearNF4.from_linear(make_linear(96, 96)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "bias" not in k}
    model.to(torch.float16).to(torch.bfloat16).double().float()
    after = model.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_distributed_checkpoint_state_dict_of_an_unsharded_model():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = torch.nn.Sequential(LinearNF4.from_linear(make_linear()), torch.nn.ReLU())
    sd = get_model_state_dict(model)  # walks every key with getattr: bitsandbytes' keys must resolve
    assert sd.keys() == model.state_dict().keys() and "0.weight.quant_state.bitsandbytes__nf4" in sd
    other = torch.nn.Sequential(LinearNF4.from_linear(make_linear(seed=5)), torch.nn.ReLU())
    set_model_state_dict(other, sd)
    _same_layer(model[0], other[0])
