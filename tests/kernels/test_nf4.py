"""NF4/FP4 kernels: the pure-torch references against the format rules, and the Triton kernels against
the references, bit for bit. On CPU the kernels run in the Triton interpreter (small shapes); with
LOWRANK_TEST_GPU=1 the same tests run compiled on CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bit_equal as assert_bitwise_equal
from helpers import bits, unpack
from lowrank.kernels import nf4 as K

pytestmark = pytest.mark.interpreter

# The 15 NF4 decision thresholds (docs/nf4.md, "Thresholds"; bit-identical to the
# literals of bitsandbytes' CUDA decision tree).
DOCUMENTED_NF4_THRESHOLDS = (
    -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
    -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
    0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
    0.5016634464263916, 0.6427869200706482, 0.8614784479141235,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------


def test_nf4_table_is_bitsandbytes_normal_map():
    scipy_stats = pytest.importorskip("scipy.stats")
    # create_normal_map(offset=0.9677083, use_extra_value=True), as in bitsandbytes.functional
    offset = 0.9677083
    positive = scipy_stats.norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-scipy_stats.norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(positive + [0.0] + negative))
    values = values / values.max()
    assert torch.equal(values.float(), K.code_table("nf4"))


def test_thresholds_are_the_documented_fp32_midpoints():
    assert K.thresholds("nf4") == DOCUMENTED_NF4_THRESHOLDS
    table = K.code_table("nf4")
    assert torch.equal(torch.tensor(K.thresholds("nf4")), (table[:-1] + table[1:]) / 2)


def test_fp4_table_layout():
    table = K.code_table("fp4")
    assert table[3].item() == 1.0 and table[11].item() == -1.0  # bit 3 is the sign
    assert torch.equal(table[:8], -table[8:]) or torch.equal(table[1:8], -table[9:])
    assert table[0].item() == 0.0 and table[8].item() == 0.0 and math.copysign(1, table[8].item()) == 1.0


def test_dynamic_map_shape_and_range():
    dyn = K.dynamic_map()
    assert dyn.shape == (256,) and dyn.dtype == torch.float32
    assert torch.equal(dyn, dyn.sort().values) and dyn.unique().numel() == 256
    assert dyn[127].item() == 0.0 and dyn[-1].item() == 1.0
    assert -0.9930 < dyn[0].item() < -0.9929


# ---------------------------------------------------------------------------------------------------
# Reference: value -> code, packing, blocks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
def test_ties_go_to_the_lower_code(quant_type):
    mids = torch.tensor(K.thresholds(quant_type))
    codes_of_sorted = torch.tensor(K.sorted_codes(quant_type))
    # With absmax exactly 1.0 the scaled value equals the input, so every midpoint is hit exactly.
    at = torch.cat([torch.tensor([1.0]), mids])
    above = torch.cat([torch.tensor([1.0]), torch.nextafter(mids, torch.tensor(2.0))])
    codes_at = unpack(K.quantize_4bit_ref(at, 32, quant_type)[0], at.numel())[1:]
    codes_above = unpack(K.quantize_4bit_ref(above, 32, quant_type)[0], above.numel())[1:]
    assert torch.equal(codes_at, codes_of_sorted[:-1].long())
    assert torch.equal(codes_above, codes_of_sorted[1:].long())


def test_packing_high_nibble_first_and_odd_padding():
    packed, absmax = K.quantize_4bit_ref(torch.tensor([1.0, -1.0]), 64)
    assert packed.tolist() == [[0xF0]] and absmax.tolist() == [1.0]
    packed, _ = K.quantize_4bit_ref(torch.tensor([2.0]), 64)
    assert packed.tolist() == [[0xF7]]  # missing low nibble = code of 0.0
    packed, _ = K.quantize_4bit_ref(torch.tensor([-3.0]), 64, "fp4")
    assert packed.tolist() == [[(11 << 4) | 0]]


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 64), (2, 3, 4, 5)])
def test_output_shapes(shape):
    x = torch.randn(shape)
    packed, absmax = K.quantize_4bit_ref(x, 32)
    n = max(1, x.numel())
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (math.ceil(n / 32),) and absmax.dtype == torch.float32
    assert K.dequantize_4bit_ref(packed, absmax, shape, torch.float32, 32).shape == shape


def test_blocks_run_over_the_flattened_tensor_and_tail_absmax_is_over_valid_elements():
    x = torch.arange(1, 101, dtype=torch.float32).reshape(4, 25)
    _, absmax = K.quantize_4bit_ref(x, 32)
    assert absmax.tolist() == [32.0, 64.0, 96.0, 100.0]


def test_non_contiguous_input_is_quantized_in_logical_order():
    x = torch.randn(40, 24)
    for view in (x.t(), x[:, ::3], x[::2].t()):
        for a, b in zip(K.quantize_4bit_ref(view, 32), K.quantize_4bit_ref(view.contiguous(), 32), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_quantize_like_their_fp32_upcast(dtype):
    x = torch.randn(333).to(dtype)
    for a, b in zip(K.quantize_4bit_ref(x, 64), K.quantize_4bit_ref(x.float(), 64), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
def test_all_zero_and_subnormal_blocks_never_give_nan(quant_type):
    x = torch.randn(5 * 64 + 10)
    x[:64] = 0.0  # full all-zero block
    x[64:128] = 1e-41  # subnormal block: 1 / absmax would overflow without the clamp
    x[128] = -1e-41
    x[-10:] = 0.0  # all-zero partial tail block
    packed, absmax = K.quantize_4bit_ref(x, 64, quant_type)
    assert absmax[0].item() == 0.0 and absmax[-1].item() == 0.0
    codes = unpack(packed, x.numel())
    assert (codes[:64] == K.ZERO_CODE[quant_type]).all() and (codes[-10:] == K.ZERO_CODE[quant_type]).all()
    out = K.dequantize_4bit_ref(packed, absmax, x.shape, torch.float32, 64, quant_type)
    assert not out.isnan().any()
    assert (bits(out[:64]) == 0).all()  # +0.0, not -0.0
    # scaled by 1/1e-38, subnormal values land near the code of 0.0
    assert out[64:129].abs().max().item() <= 1e-41


def test_dequantize_is_the_fp32_product_then_one_cast():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    packed, absmax = K.quantize_4bit_ref(x, 128)
    table = K.code_table("nf4")
    product = table[unpack(packed, 1000)] * absmax.repeat_interleave(128)[:1000]
    for dtype in K.FLOAT_DTYPES:
        assert_bitwise_equal(K.dequantize_4bit_ref(packed, absmax, (1000,), dtype, 128), product.to(dtype))


# ---------------------------------------------------------------------------------------------------
# Reference: double quantization
# ---------------------------------------------------------------------------------------------------


def test_double_quantize_is_exact_nearest_around_the_mean():
    absmax = torch.rand(700, generator=torch.Generator().manual_seed(0)) * 3 + 0.01
    q, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    assert q.dtype == torch.uint8 and nested_absmax.shape == (3,) and nested_offset.dim() == 0
    assert torch.equal(nested_offset, absmax.mean())
    centred = absmax - nested_offset
    assert torch.equal(nested_absmax, torch.stack([c.abs().max() for c in centred.split(256)]))
    scaled = (centred * (1.0 / nested_absmax).repeat_interleave(256)[:700]).clamp(-1, 1)
    distance = (K.dynamic_map()[None, :] - scaled[:, None]).abs()
    best = distance.min(dim=1).values
    # q is at minimal distance (ties to the lower index follow from bucketize; checked by the next test)
    assert torch.equal(distance.gather(1, q.long()[:, None])[:, 0], best)


def test_double_quantize_tie_goes_to_the_lower_code():
    dyn = K.dynamic_map()
    mid = ((dyn[200] + dyn[201]) / 2).item()
    # mean 0 and nested_absmax 1, so the scaled values are exactly the inputs
    q, nested_absmax, nested_offset = K.double_quantize_ref(torch.tensor([1.0, -1.0, mid, -mid]))
    assert nested_offset.item() == 0.0 and nested_absmax.item() == 1.0
    assert q[2].item() == 200
    above = torch.nextafter(torch.tensor(mid), torch.tensor(1.0)).item()
    assert K.double_quantize_ref(torch.tensor([1.0, -1.0, above, -above]))[0][2].item() == 201


def test_double_quantize_constant_block_is_the_zero_code():
    q, nested_absmax, nested_offset = K.double_quantize_ref(torch.full((300,), 0.25))
    assert nested_absmax.tolist() == [0.0, 0.0] and (q == 127).all()
    assert torch.equal(K.double_dequantize_ref(q, nested_absmax, nested_offset), torch.full((300,), 0.25))


def test_double_dequantize_formula_and_nested_dtypes():
    absmax = torch.rand(600, generator=torch.Generator().manual_seed(0)) + 0.05
    q, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    product = K.dynamic_map()[q.long()] * nested_absmax.repeat_interleave(256)[:600]
    assert_bitwise_equal(K.double_dequantize_ref(q, nested_absmax, nested_offset), product + nested_offset)
    for dtype in (torch.bfloat16, torch.float16):
        expected = (product.to(dtype) + nested_offset.to(dtype)).float()
        assert_bitwise_equal(K.double_dequantize_ref(q, nested_absmax, nested_offset, dtype), expected)
    rec = K.double_dequantize_ref(q, nested_absmax, nested_offset)
    # nearest code: the error is at most half the widest gap of the map, times the block scale
    dyn = K.dynamic_map()
    bound = (dyn.diff().max() / 2 * nested_absmax.repeat_interleave(256)[:600]) * (1 + 1e-6) + 1e-7
    assert ((rec - absmax).abs() <= bound).all()


def test_bnb_cpu_lut_rounding_differs_rarely_from_nearest():
    absmax = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.01
    nearest = K.double_quantize_ref(absmax, "nearest")[0]
    lut = K.double_quantize_ref(absmax, "bnb_cpu_lut")[0]
    differ = (nearest != lut).float().mean().item()
    assert 0 < differ < 0.02
    dyn = K.dynamic_map()
    assert ((dyn[nearest.long()] - dyn[lut.long()]).abs() <= dyn.diff().max()).all()


# ---------------------------------------------------------------------------------------------------
# Triton kernels == references, bit for bit
# ---------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # (shape, blocksize, quant_type, input dtype, layout)
    ((37, 50), 64, "nf4", torch.float32, "contiguous"),
    ((3, 5, 129), 32, "nf4", torch.bfloat16, "contiguous"),
    ((5001,), 4096, "nf4", torch.float16, "contiguous"),
    ((64, 33), 128, "nf4", torch.float32, "transposed"),
    ((1,), 64, "nf4", torch.float32, "contiguous"),
    ((7, 9), 256, "fp4", torch.bfloat16, "transposed"),
    ((2, 600), 512, "fp4", torch.float32, "contiguous"),
    ((1030,), 1024, "nf4", torch.bfloat16, "contiguous"),
    ((3, 1500), 2048, "fp4", torch.float16, "contiguous"),
]


def make_input(shape, dtype, layout, blocksize, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, math.prod(shape)).reshape(shape)
    if x.numel() > 2 * blocksize:
        x.view(-1)[blocksize : 2 * blocksize] = 0.0  # an all-zero block
    x = x.to(dtype).to(device)
    return x.t() if layout == "transposed" else x


@pytest.mark.parametrize("shape, blocksize, quant_type, dtype, layout", KERNEL_CASES)
def test_triton_quantize_matches_reference(shape, blocksize, quant_type, dtype, layout, device):
    x = make_input(shape, dtype, layout, blocksize, device)
    packed, absmax = K.quantize_4bit(x, blocksize, quant_type)
    ref_packed, ref_absmax = K.quantize_4bit_ref(x.cpu(), blocksize, quant_type)
    assert_bitwise_equal(packed, ref_packed)
    assert_bitwise_equal(absmax, ref_absmax)


@pytest.mark.parametrize("shape, blocksize, quant_type, dtype, layout", KERNEL_CASES)
def test_triton_dequantize_matches_reference(shape, blocksize, quant_type, dtype, layout, device):
    x = make_input(shape, dtype, layout, blocksize, device, seed=1)
    packed, absmax = K.quantize_4bit_ref(x.cpu(), blocksize, quant_type)
    q, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    logical_shape = tuple(x.shape)
    for out_dtype in K.FLOAT_DTYPES:
        expected = K.dequantize_4bit_ref(packed, absmax, logical_shape, out_dtype, blocksize, quant_type)
        got = K.dequantize_4bit(
            packed.to(device), absmax.to(device), None, None, logical_shape, out_dtype, blocksize, quant_type
        )
        assert_bitwise_equal(got, expected)
        for nested_dtype in K.NESTED_DTYPES:
            rec = K.double_dequantize_ref(q, nested_absmax, nested_offset, nested_dtype)
            expected = K.dequantize_4bit_ref(packed, rec, logical_shape, out_dtype, blocksize, quant_type)
            got = K.dequantize_4bit(
                packed.to(device), q.to(device), nested_absmax.to(device), nested_offset.to(device),
                logical_shape, out_dtype, blocksize, quant_type, nested_dtype,
            )  # fmt: skip
            assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("nb", [1, 255, 256, 700])
def test_triton_double_quantize_and_dequantize_match_reference(nb, device):
    gen = torch.Generator().manual_seed(nb)
    absmax = torch.rand(nb, generator=gen) * torch.logspace(-2, 1, nb)
    if nb > 300:
        absmax[256:512] = absmax.mean()  # a nested block that is exactly the mean: all-zero after centring
    got = K.double_quantize(absmax.to(device))
    expected = K.double_quantize_ref(absmax)
    for a, b in zip(got, expected, strict=True):
        assert_bitwise_equal(a, b)
    for nested_dtype in K.NESTED_DTYPES:
        rec = K.double_dequantize(*(t.to(device) for t in expected), nested_dtype)
        assert_bitwise_equal(rec, K.double_dequantize_ref(*expected, nested_dtype))


def test_triton_all_zero_tensor(device):
    x = torch.zeros(3, 70, device=device)
    packed, absmax = K.quantize_4bit(x, 32)
    assert (packed.cpu() == 0x77).all() and (absmax.cpu() == 0).all()
    out = K.dequantize_4bit(packed, absmax, None, None, (3, 70), torch.bfloat16, 32)
    assert (bits(out.cpu()) == 0).all()


# ---------------------------------------------------------------------------------------------------
# Validation: clear errors before any kernel runs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [K.quantize_4bit_ref, K.quantize_4bit], ids=["ref", "triton"])
def test_quantize_rejects_bad_arguments(fn):
    with pytest.raises(ValueError, match="blocksize must be one of .* got 16"):
        fn(torch.randn(64), 16)
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'int4'"):
        fn(torch.randn(64), 64, "int4")
    with pytest.raises(TypeError, match="dtype must be one of .* got torch.float64"):
        fn(torch.randn(64, dtype=torch.float64), 64)
    with pytest.raises(TypeError, match="dtype must be one of .* got torch.int8"):
        fn(torch.ones(64, dtype=torch.int8), 64)
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 3\)\)"):
        fn(torch.randn(0, 3), 64)


def test_dequantize_launcher_rejects_bad_arguments():
    packed, absmax = K.quantize_4bit_ref(torch.randn(100), 64)
    q, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    ok = dict(
        packed=packed,
        absmax=absmax,
        nested_absmax=None,
        nested_offset=None,
        shape=(100,),
        dtype=torch.float32,
        blocksize=64,
    )
    cases = [
        (dict(packed=packed[:-1]), ValueError, "packed must be uint8 with 50 bytes .* got torch.uint8 with 49"),
        (dict(packed=packed.view(torch.int8)), ValueError, "packed must be uint8 .* got torch.int8"),
        (
            dict(absmax=absmax[:1]),
            ValueError,
            "absmax must be torch.float32 with 2 entries .* got torch.float32 with 1",
        ),
        (dict(absmax=q), ValueError, "absmax must be torch.float32 .* got torch.uint8"),
        (dict(absmax=q, nested_absmax=nested_absmax), ValueError, "needs a one-element float32 nested_offset"),
        (
            dict(absmax=q, nested_absmax=nested_absmax[:0], nested_offset=nested_offset),
            ValueError,
            "nested_absmax must be float32 with 1 entries",
        ),
        (dict(nested_offset=nested_offset), ValueError, "nested_offset given without nested_absmax"),
        (dict(shape=(0,)), ValueError, r"shape \(0,\) has no elements"),
        (dict(shape=(10, -10)), ValueError, "non-negative ints"),
        (dict(dtype=torch.int32), TypeError, "output dtype must be one of .* got torch.int32"),
        (dict(blocksize=100), ValueError, "blocksize must be one of .* got 100"),
        (dict(absmax=absmax.to("meta")), ValueError, "one device, got packed on cpu, absmax on meta"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            K.dequantize_4bit(**{**ok, **change})
        if change.get("nested_absmax") is None and change.get("nested_offset") is None:
            kwargs = {**ok, **change}
            del kwargs["nested_absmax"], kwargs["nested_offset"]
            with pytest.raises(error, match=message):
                K.dequantize_4bit_ref(**kwargs)


@pytest.mark.parametrize("fn", [K.double_dequantize_ref, K.double_dequantize], ids=["ref", "triton"])
def test_double_dequantize_rejects_bad_arguments(fn):
    q, nested_absmax, nested_offset = K.double_quantize_ref(torch.rand(300) + 0.1)
    with pytest.raises(ValueError, match="nested_absmax must be float32 with 2 entries, got torch.float32 with 1"):
        fn(q, nested_absmax[:1], nested_offset)
    with pytest.raises(ValueError, match="qabsmax must be a non-empty 1-D uint8 tensor, got torch.float32"):
        fn(q.float(), nested_absmax, nested_offset)
    with pytest.raises(ValueError, match="nested_offset must be a one-element float32 tensor, got torch.float64"):
        fn(q, nested_absmax, nested_offset.double())
    with pytest.raises(ValueError, match="share a device, got cpu, meta, cpu"):
        fn(q, nested_absmax.to("meta"), nested_offset)
    with pytest.raises(TypeError, match="nested_dtype must be one of .* got torch.int8"):
        fn(q, nested_absmax, nested_offset, torch.int8)


@pytest.mark.parametrize("fn", [K.double_quantize_ref, K.double_quantize], ids=["ref", "triton"])
def test_double_quantize_rejects_bad_absmax(fn):
    for bad in (torch.rand(10, dtype=torch.float64), torch.rand(2, 5), torch.rand(0)):
        with pytest.raises(ValueError, match="absmax must be a non-empty 1-D float32 tensor"):
            fn(bad)
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'bnb_cpu_lut', got 'up'"):
        K.double_quantize_ref(torch.rand(10), "up")


def test_references_compile_to_the_same_bits():
    """``torch.compile`` of the references (what the benchmarks' compiled provider runs) gives the eager bits,
    partial last blocks included. Inductor on CPU (torch 2.13) miscompiled the gather ``absmax[arange(n) //
    blocksize]`` in a partial last block, so the references broadcast the constants with repeat_interleave."""

    def dequantize_flat(packed, absmax, nested_absmax, nested_offset, numel: int):
        return K.dequantize_4bit_ref(
            packed, K.double_dequantize_ref(absmax, nested_absmax, nested_offset), (numel,), torch.bfloat16, 64, "nf4"
        )

    compiled = torch.compile(dequantize_flat, dynamic=True)
    for n in (64 * 5 + 3, 64 * 300 + 17):  # 6 and 301 blocks: the nested 256-block is partial in both
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        packed, absmax = K.quantize_4bit_ref(x, 64, "nf4")
        nested = K.double_quantize_ref(absmax)
        assert_bitwise_equal(compiled(packed, *nested, n), dequantize_flat(packed, *nested, n))
