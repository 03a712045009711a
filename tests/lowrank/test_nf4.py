"""Public NF4 API: quantize / dequantize / NF4Weight, every backend usable here, safetensors round trips,
clear errors for bad input and corrupted state, and hypothesis property tests."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lowrank.kernels import nf4 as K

import lowrank
from lowrank.nf4 import NF4Weight, QuantStateError, dequantize, dequantize_absmax, quantize
from lowrank.ops import dispatch


def usable_backends() -> list[str]:
    return dispatch.usable_backends("dequantize_4bit", "cpu")


def assert_same_weight(a: NF4Weight, b: NF4Weight) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize and a.quant_type == b.quant_type
    assert a.nested_dtype == b.nested_dtype and a.tensors().keys() == b.tensors().keys()
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        assert tensor.dtype == other.dtype and torch.equal(bits(tensor).reshape(-1), bits(other).reshape(-1)), name


# ---------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize, quant_type, dtype", [
    ((48, 80), 64, "nf4", torch.bfloat16), ((7, 3, 11), 32, "fp4", torch.float16), ((300,), 128, "nf4", torch.float32),
])  # fmt: skip
def test_every_usable_backend_gives_the_same_bits(shape, blocksize, quant_type, dtype, double_quant):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    reference = quantize(x, blocksize, double_quant, quant_type, backend="torch")
    for backend in usable_backends():
        qw = quantize(x, blocksize, double_quant, quant_type, backend=backend)
        assert_same_weight(qw, reference)
        for out_dtype in K.FLOAT_DTYPES:
            got = dequantize(qw, out_dtype, backend=backend)
            assert torch.equal(bits(got), bits(dequantize(reference, out_dtype, backend="torch"))), (backend, out_dtype)
        assert torch.equal(dequantize_absmax(qw, backend=backend), dequantize_absmax(reference, backend="torch"))
        if double_quant:  # a state that names a bf16/fp16 nested dtype decodes the same on every backend
            for nested_dtype in (torch.bfloat16, torch.float16):
                variant = dataclasses.replace(qw, nested_dtype=nested_dtype)
                expected = dequantize(dataclasses.replace(reference, nested_dtype=nested_dtype), backend="torch")
                assert torch.equal(bits(dequantize(variant, backend=backend)), bits(expected)), (backend, nested_dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_into_a_reused_buffer_gives_the_same_bits(double_quant):
    x = torch.randn(37, 130, generator=torch.Generator().manual_seed(1))  # odd numel, partial last block
    qw = quantize(x, 64, double_quant, "nf4", backend="torch")
    for backend in usable_backends():
        for out_dtype in K.FLOAT_DTYPES:
            expected = dequantize(qw, out_dtype, backend="torch")
            buffer = torch.full((37, 130), float("nan"), dtype=out_dtype)
            for _ in range(2):  # the second call overwrites the first's result in place
                got = dequantize(qw, backend=backend, out=buffer)
                assert got is buffer and torch.equal(bits(got), bits(expected)), (backend, out_dtype)


def test_dequantize_rejects_a_wrong_out_buffer():
    qw = quantize(torch.randn(8, 8))
    for backend in usable_backends():
        with pytest.raises(
            ValueError,
            match=r"out must be a torch.float32 tensor of shape \(8, 8\) on cpu, got "
            r"torch.float32 of shape \(8, 4\)",
        ):
            dequantize(qw, backend=backend, out=torch.empty(8, 4))
        with pytest.raises(ValueError, match=r"out must be a torch.bfloat16 tensor .* got torch.float32"):
            dequantize(qw, torch.bfloat16, backend=backend, out=torch.empty(8, 8))
        with pytest.raises(ValueError, match="out must be contiguous"):
            dequantize(qw, backend=backend, out=torch.empty(8, 8).t())
        with pytest.raises(ValueError, match="must not require grad"):
            dequantize(qw, backend=backend, out=torch.empty(8, 8, requires_grad=True))
        with pytest.raises(TypeError, match="out must be a torch.Tensor, got list"):
            dequantize(qw, torch.float32, backend=backend, out=[0.0] * 64)


def test_defaults_and_derived_facts():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    qw = quantize(x)
    assert qw.blocksize == 64 and qw.quant_type == "nf4" and qw.double_quant and qw.nested_dtype == torch.float32
    assert qw.shape == x.shape and qw.dtype == torch.bfloat16 and qw.device == x.device and qw.numel == x.numel()
    assert dequantize(qw).dtype == torch.bfloat16 and dequantize(qw).shape == x.shape
    # 4 bits + 8/64 bits of codes + 32/(64*256) bits of nested scales, plus the 4-byte offset
    expected_bits = 4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel()
    assert math.isclose(qw.bits_per_param, expected_bits, rel_tol=1e-12)
    assert math.isclose(quantize(x, double_quant=False).bits_per_param, 4.5, rel_tol=1e-12)
    assert dequantize_absmax(quantize(x, double_quant=False)).dtype == torch.float32


def test_all_zero_weight_round_trips_to_positive_zero_with_double_quant():
    for backend in usable_backends():
        qw = quantize(torch.zeros(5, 100), 32, backend=backend)
        out = dequantize(qw, torch.float32, backend=backend)
        assert (bits(out) == 0).all(), backend


def test_to_meta_keeps_shapes_and_checks():
    qw = quantize(torch.randn(40, 64)).to("meta")
    assert qw.device.type == "meta" and qw.packed.shape == (1280, 1)


# ---------------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant, quant_type, nested_dtype", [
    (True, "nf4", torch.float32), (False, "nf4", torch.float32),
    (True, "fp4", torch.float32), (True, "nf4", torch.bfloat16),
])  # fmt: skip
def test_safetensors_round_trip_is_exact(tmp_path, double_quant, quant_type, nested_dtype):
    from safetensors.torch import load_file, save_file

    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(2)).half()
    qw = quantize(x, 64, double_quant, quant_type)
    if double_quant:
        qw = dataclasses.replace(qw, nested_dtype=nested_dtype)
    path = tmp_path / "model.safetensors"
    save_file({**qw.to_bnb_state_dict("layers.0.w"), "other": torch.ones(3)}, str(path))
    loaded = NF4Weight.from_bnb_state_dict(load_file(str(path)), "layers.0.w")
    assert_same_weight(loaded, qw)
    assert torch.equal(bits(dequantize(loaded)), bits(dequantize(qw)))


def test_state_dict_layout_is_bitsandbytes():
    qw = quantize(torch.randn(128, 300, generator=torch.Generator().manual_seed(3)).bfloat16())
    sd = qw.to_bnb_state_dict()
    assert set(sd) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }  # fmt: skip
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert blob == {
        "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 300], "nested_blocksize": 256,
        "nested_dtype": "float32", "nested_offset": qw.nested_offset.item(),
    }  # fmt: skip
    assert torch.tensor(blob["nested_offset"], dtype=torch.float32).item() == qw.nested_offset.item()
    assert sd["weight"].shape == (19200, 1) and sd["weight.absmax"].dtype == torch.uint8


def test_quant_storage_bytes_are_reinterpreted():
    qw = quantize(torch.randn(16, 64))
    sd = qw.to_bnb_state_dict()
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)  # quant_storage=bf16
    assert_same_weight(NF4Weight.from_bnb_state_dict(sd), qw)


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the value
# ---------------------------------------------------------------------------------------------------


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"weight is empty \(shape \(0, 64\)\)"):
        quantize(torch.randn(0, 64))
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(4, 8)
        w[2, 5] = bad
        with pytest.raises(ValueError, match=rf"non-finite values \(first at index \[2, 5\]: {bad}\)"):
            quantize(w)
    with pytest.raises(TypeError, match="weight dtype must be one of .* got torch.float64"):
        quantize(torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight dtype must be one of .* got torch.int32"):
        quantize(torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="blocksize must be one of .* got 48"):
        quantize(torch.randn(8), 48)
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'nf8'"):
        quantize(torch.randn(8), 64, quant_type="nf8")
    with pytest.raises(ValueError, match=r"shape \(4, 64\) is on the meta device"):
        quantize(torch.randn(4, 64, device="meta"))
    with pytest.raises(ValueError, match="'cuda' is not a backend"):
        quantize(torch.randn(8), backend="cuda")


def test_dequantize_rejects_bad_input():
    qw = quantize(torch.randn(8, 8))
    with pytest.raises(TypeError, match="dtype must be float32/float16/bfloat16, got torch.int8"):
        dequantize(qw, torch.int8)
    with pytest.raises(TypeError, match="expects an NF4Weight, got Tensor"):
        dequantize(torch.randn(4))
    with pytest.raises(TypeError, match="expects an NF4Weight, got Tensor"):
        dequantize_absmax(torch.randn(4))


def test_nf4weight_rejects_inconsistent_fields():
    good = quantize(torch.randn(10, 70), 64)
    cases = [
        (
            dict(packed=good.packed[:-1]),
            "packed must be uint8 with 350 bytes for shape \\(10, 70\\), got torch.uint8 with 349",
        ),
        (dict(absmax=good.absmax[:5]), "absmax must be torch.uint8 with 11 entries .* got torch.uint8 with 5"),
        (
            dict(nested_absmax=good.nested_absmax.half()),
            "nested_absmax must be float32 with 1 entries, got torch.float16",
        ),
        (dict(nested_offset=None), "needs a one-element float32 nested_offset, got None"),
        (dict(nested_offset=torch.tensor([1.0, 2.0])), "one-element float32 nested_offset, got torch.float32 with 2"),
        (dict(nested_offset=torch.tensor(float("nan"))), "non-finite"),
        (dict(absmax=good.absmax.to("meta")), "one device, got packed on cpu, absmax on meta"),
        (dict(blocksize=100), "blocksize must be one of .* got 100"),
        (dict(quant_type="int4"), "quant_type must be one of .* got 'int4'"),
        (dict(dtype=torch.float64), "dtype must be float32/float16/bfloat16, got torch.float64"),
        (dict(nested_dtype=torch.int8), "nested_dtype must be float32/float16/bfloat16, got torch.int8"),
        (dict(shape=(0, 70)), "has no elements"),
        (dict(packed=good.packed.numpy()), "packed must be a torch.Tensor, got ndarray"),
    ]
    for change, message in cases:
        with pytest.raises(QuantStateError, match=message):
            dataclasses.replace(good, **change)
    plain = quantize(torch.randn(10, 70), 64, double_quant=False)
    with pytest.raises(QuantStateError, match="nested_offset given without nested_absmax"):
        dataclasses.replace(plain, nested_offset=torch.tensor(0.5))
    with pytest.raises(QuantStateError, match="absmax holds non-finite values"):
        dataclasses.replace(plain, absmax=torch.full_like(plain.absmax, float("inf")))


def corrupt_blob(sd: dict, **changes) -> dict:
    key = "weight.quant_state.bitsandbytes__nf4"
    blob = json.loads(bytes(sd[key].tolist()).decode())
    for field, value in changes.items():
        if value is ...:
            del blob[field]
        else:
            blob[field] = value
    return {**sd, key: torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)}


def test_corrupted_state_dicts_are_rejected_with_the_key_named():
    sd = quantize(torch.randn(10, 70), 64).to_bnb_state_dict()
    blob_key = "weight.quant_state.bitsandbytes__nf4"
    without = lambda key: {k: v for k, v in sd.items() if k != key}  # noqa: E731
    cases = [
        ({**sd, "weight": sd["weight"][:-3]}, "packed must be uint8 with 350 bytes .* got torch.uint8 with 347"),
        ({**sd, "weight.absmax": sd["weight.absmax"][:-1]}, "absmax must be torch.uint8 with 11 entries"),
        ({**sd, "weight.absmax": sd["weight.absmax"].float()}, "absmax must be torch.uint8 .* got torch.float32"),
        ({**sd, "weight.nested_absmax": torch.ones(2)}, "nested_absmax must be float32 with 1 entries"),
        (without("weight.absmax"), "missing tensor 'weight.absmax'"),
        (without("weight.quant_map"), "missing tensor 'weight.quant_map'"),
        (without("weight.nested_quant_map"), "missing tensor 'weight.nested_quant_map'"),
        (without(blob_key), "expected exactly one 'weight.quant_state.bitsandbytes__<nf4|fp4>' entry, found none"),
        ({**sd, "weight.quant_state.bitsandbytes__fp4": sd[blob_key]}, "expected exactly one .* found \\["),
        ({**sd, blob_key: sd[blob_key][:-5]}, "weight.quant_state.bitsandbytes__nf4 is not valid UTF-8 JSON"),
        ({**sd, blob_key: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}, "is not valid UTF-8 JSON"),
        ({**sd, blob_key: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}, "must hold a JSON object, got list"),
        (
            {**sd, blob_key: sd[blob_key].float()},
            "must be a uint8 tensor of UTF-8 JSON bytes, got a torch.float32 tensor",
        ),
        (corrupt_blob(sd, blocksize=...), r"lacks the fields \['blocksize'\]"),
        (corrupt_blob(sd, quant_type="fp4"), "says quant_type 'fp4', which does not match its key"),
        (corrupt_blob(sd, quant_type="q4"), "quant_type 'q4' is not one of"),
        (corrupt_blob(sd, blocksize=48), "blocksize 48 is not one of"),
        (corrupt_blob(sd, blocksize=True), "blocksize True is not one of"),
        (corrupt_blob(sd, dtype="float64"), "dtype 'float64' is not one of"),
        (corrupt_blob(sd, shape=[10, "70"]), "shape must be a list of non-negative ints, got \\[10, '70'\\]"),
        (corrupt_blob(sd, shape=[10, 71]), "packed must be uint8 with 355 bytes"),
        (corrupt_blob(sd, nested_offset="0.1"), "nested_offset must be a finite number, got '0.1'"),
        (corrupt_blob(sd, nested_offset=float("nan")), "nested_offset must be a finite number, got nan"),
        (corrupt_blob(sd, nested_blocksize=128), "nested_blocksize must be 256, got 128"),
        (corrupt_blob(sd, nested_dtype="int8"), "nested_dtype 'int8' is not one of"),
        (corrupt_blob(sd, nested_offset=...), r"double-quantized weight but lacks \['nested_offset'\]"),
        ({**sd, "weight.quant_map": K.code_table("fp4")}, "weight.quant_map is not the standard nf4 code table"),
        ({**sd, "weight.quant_map": K.code_table("nf4")[:8]}, "weight.quant_map is not the standard nf4 code table"),
        ({**sd, "weight.nested_quant_map": -K.dynamic_map()}, "nested_quant_map is not the signed 8-bit dynamic map"),
        ({**sd, "weight.absmax": [1, 2]}, "'weight.absmax' must be a tensor, got list"),
    ]
    for corrupted, message in cases:
        with pytest.raises(QuantStateError, match=message):
            NF4Weight.from_bnb_state_dict(corrupted)
    with pytest.raises(QuantStateError, match="expected exactly one 'layer.quant_state"):
        NF4Weight.from_bnb_state_dict(sd, "layer")


# ---------------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------------

# Finite values, no subnormals and no magnitudes so small that the dequantized products underflow.
finite_values = st.one_of(
    st.just(0.0),
    st.floats(min_value=2.0**-60, max_value=2.0**60, width=32, allow_subnormal=False),
    st.floats(min_value=-(2.0**60), max_value=-(2.0**-60), width=32, allow_subnormal=False),
)


@st.composite
def weights(draw):
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    n = math.prod(shape)
    if n <= 256 and draw(st.booleans()):
        values = draw(st.lists(finite_values, min_size=n, max_size=n))
        x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    else:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
        x = x * 10 ** draw(st.integers(-6, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    if dtype != torch.float32:
        info = torch.finfo(dtype)
        x = x.clamp(-info.max, info.max)
        x = torch.where(x.abs() < info.tiny, torch.zeros_like(x), x)  # keep clear of subnormals
    x = x.to(dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        x = x.transpose(0, 1)
    return x


PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(x=weights(), blocksize=st.sampled_from(K.BLOCKSIZES), quant_type=st.sampled_from(K.QUANT_TYPES))
def test_property_shapes_error_bound_and_no_nan(x, blocksize, quant_type):
    qw = quantize(x, blocksize, double_quant=False, quant_type=quant_type, backend="torch")
    n = x.numel()
    assert qw.packed.shape == ((n + 1) // 2, 1) and qw.absmax.shape == (math.ceil(n / blocksize),)
    out = dequantize(qw, torch.float32, backend="torch")
    assert out.shape == x.shape and not out.isnan().any()
    # every element is within half the widest gap of the code table, times its block's absmax
    table = K.code_table(quant_type).sort().values
    half_gap = (table.diff().max() / 2).item()
    block_absmax = qw.absmax.repeat_interleave(blocksize)[:n].reshape(-1)
    err = (out.reshape(-1) - x.float().reshape(-1)).abs()
    assert (err <= block_absmax * half_gap * (1 + 1e-6)).all()


@PROPERTY_SETTINGS
@given(x=weights(), blocksize=st.sampled_from(K.BLOCKSIZES), double_quant=st.booleans())
def test_property_requantizing_the_dequantized_weight_is_idempotent(x, blocksize, double_quant):
    qw = quantize(x, blocksize, double_quant=False, backend="torch")
    again = quantize(dequantize(qw, torch.float32, backend="torch"), blocksize, double_quant=False, backend="torch")
    assert torch.equal(again.packed, qw.packed) and torch.equal(again.absmax, qw.absmax)


@settings(max_examples=15, deadline=None)
@given(x=weights(), blocksize=st.sampled_from([32, 64, 256]), double_quant=st.booleans())
def test_property_triton_matches_torch(x, blocksize, double_quant):
    if "triton" not in usable_backends():
        pytest.skip("triton is not usable here")
    a = quantize(x, blocksize, double_quant, backend="torch")
    b = quantize(x, blocksize, double_quant, backend="triton")
    assert_same_weight(a, b)
    assert torch.equal(bits(dequantize(a, backend="torch")), bits(dequantize(b, backend="triton")))


def test_package_exports():
    assert lowrank.quantize is quantize and lowrank.dequantize is dequantize and lowrank.NF4Weight is NF4Weight
