"""lowrank's NF4/FP4 format against bitsandbytes (>= 0.50, CPU) as the oracle: bytes, constants,
dequantized values and serialized state, bit for bit.

bitsandbytes is a test-only dependency. Where bitsandbytes' CPU path has a documented quirk
(docs/nf4.md, "bitsandbytes on the CPU", quirks 1-4) the random comparison checks that the difference
is exactly that quirk, and a test of its own shows the quirk.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings

import pytest
import torch
from helpers import assert_bit_equal as assert_bitwise_equal
from helpers import unpack
from lowrank.kernels import nf4 as K

from lowrank import nf4 as api
from lowrank.ops import nf4 as ops

bnb = pytest.importorskip("bitsandbytes")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default import ops as bnb_default_ops
    from bitsandbytes.nn import Linear4bit, Params4bit

pytestmark = pytest.mark.oracle

if tuple(int(p) for p in bnb.__version__.split(".")[:2]) < (0, 50):
    pytest.skip(f"the oracle needs bitsandbytes >= 0.50, found {bnb.__version__}", allow_module_level=True)

# bitsandbytes wraps its pure-torch dequantization in torch.compile (slow to compile, recompiles per
# dtype); the plain function it wraps computes the same values.
_dequantize_4bit_compute = getattr(
    bnb_default_ops._dequantize_4bit_compute, "__wrapped__", bnb_default_ops._dequantize_4bit_compute
)
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
STATS_FILE = os.path.join(os.path.dirname(__file__), "..", "data", "nf4_roundtrip_stats.json")
# bitsandbytes' CPU clamp for the absmax of an all-zero partial block (1e-38 in fp32).
BNB_ZERO_TAIL_ABSMAX = torch.tensor(1e-38, dtype=torch.float32).item()


def codes_by_division(x: torch.Tensor, absmax: float, quant_type: str) -> torch.Tensor:
    """Codes bitsandbytes' CPU path gives a partial last block: ``x / absmax`` instead of ``x * (1/absmax)``."""
    scaled = (x.float() / torch.tensor(absmax, dtype=torch.float32)).clamp(-1, 1)
    position = torch.bucketize(scaled, torch.tensor(K.thresholds(quant_type)))
    return torch.tensor(K.sorted_codes(quant_type))[position].long()


def bnb_quantize(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def bnb_reconstructed_absmax(state) -> torch.Tensor:
    """bitsandbytes' own reconstruction of double-quantized constants (functional.dequantize_4bit)."""
    if not state.nested:
        return state.absmax
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def bnb_dequantize_pure_torch(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' pure-torch dequantization: the safe oracle (no native-kernel quirks)."""
    code = K.code_table(state.quant_type)
    absmax = bnb_reconstructed_absmax(state)
    return _dequantize_4bit_compute(
        packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize, state.shape, dtype
    )


def native_dequant_runs(shape, blocksize: int) -> bool:
    """Whether bnb's CPU dequant runs its native kernel; otherwise it calls the (torch.compile'd) pure-torch
    path that the tests already compare against, and compiling it per dtype would only cost time."""
    return len(shape) > 0 and shape[-1] % 2 == 0 and not (HAS_AVX512 and blocksize >= 2048)


def native_dequant_has_avx512_bug(shape, blocksize: int) -> bool:
    """docs/nf4.md, CPU quirk 3: bnb's AVX-512 dequant indexes absmax per row when rows are not block-aligned."""
    if not HAS_AVX512 or len(shape) == 0 or blocksize >= 2048 or shape[-1] % 2:
        return False
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return shape[-1] % 16 == 0 and shape[-1] % blocksize != 0 and rows >= 2


# ---------------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("randn_decades", "uniform", "student_t", "zero_runs", "coarse_grid")


def random_values(n: int, distribution: str, gen: torch.Generator) -> torch.Tensor:
    if distribution == "randn_decades":  # magnitudes over 5 decades
        return torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 5 - 3)
    if distribution == "uniform":
        return torch.rand(n, generator=gen) * 2 - 1
    if distribution == "student_t":  # heavy tails: Student-t with 2 degrees of freedom
        normal = torch.randn(n, generator=gen)
        chi2 = torch.randn(n, 2, generator=gen).pow(2).sum(1)
        return normal / (chi2 / 2).sqrt()
    if distribution == "zero_runs":
        x = torch.randn(n, generator=gen)
        for _ in range(3):
            start = int(torch.randint(0, n, (1,), generator=gen))
            x[start : start + int(torch.randint(1, 300, (1,), generator=gen))] = 0.0
        return x
    if distribution == "coarse_grid":  # few distinct values: many exact ties in |x| and in the scaled values
        return torch.randint(-4, 5, (n,), generator=gen).float() / 4
    raise AssertionError(distribution)


def random_case(seed: int, max_elements: int = 12000):
    rng = random.Random(seed)
    rank = rng.choice([1, 2, 2, 3])
    budget = rng.randint(1, max_elements)
    shape = []
    for axis in range(rank):
        remaining = max(1, budget // max(1, math.prod(shape)))
        shape.append(
            remaining if axis == rank - 1 else rng.randint(1, max(1, int(remaining ** (1 / (rank - axis))) * 2))
        )
    shape = tuple(shape)
    dtype = rng.choice(K.FLOAT_DTYPES)
    blocksize = rng.choice(K.BLOCKSIZES)
    quant_type = rng.choice(["nf4", "nf4", "fp4"])
    distribution = rng.choice(DISTRIBUTIONS)
    transposed = rank >= 2 and rng.random() < 0.3
    gen = torch.Generator().manual_seed(seed)
    x = random_values(math.prod(shape), distribution, gen).reshape(shape).to(dtype)
    if transposed:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same logical shape, non-contiguous
    return x, blocksize, quant_type, distribution


def check_against_bnb(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    n = x.numel()
    full = n - n % blocksize
    packed, absmax = K.quantize_4bit_ref(x, blocksize, quant_type)
    bnb_packed, bnb_state = bnb_quantize(x, blocksize, quant_type, double_quant=False)
    bnb_absmax = bnb_state.absmax
    assert bnb_packed.shape == packed.shape and bnb_absmax.shape == absmax.shape

    # Full blocks: identical bytes and constants.
    assert torch.equal(packed.reshape(-1)[: full // 2], bnb_packed.reshape(-1)[: full // 2])
    assert_bitwise_equal(absmax[: full // blocksize], bnb_absmax[: full // blocksize], "absmax")
    # Partial last block: bnb divides (quirk 1) and clamps an all-zero tail's absmax to 1e-38 (quirk 2).
    if full < n:
        tail_absmax = absmax[-1].item()
        if tail_absmax == 0.0:
            assert bnb_absmax[-1].item() == BNB_ZERO_TAIL_ABSMAX
        else:
            assert bnb_absmax[-1].item() == tail_absmax
        tail = x.reshape(-1)[full:]
        expected_tail = codes_by_division(tail, bnb_absmax[-1].item(), quant_type)
        assert torch.equal(unpack(bnb_packed, n)[full:], expected_tail)
        ours_tail = unpack(packed, n)[full:]
        explained = (ours_tail == expected_tail) | (
            codes_by_division(tail, tail_absmax or 1.0, quant_type) != ours_tail
        )  # every difference is a division-vs-reciprocal rounding
        assert bool(explained.all())

    # Double quantization of bitsandbytes' own constants: bnb-CPU nested codes are its 65,536-bin LUT.
    _, bnb_dq_state = bnb_quantize(x, blocksize, quant_type, double_quant=True)
    q, nested_absmax, nested_offset = K.double_quantize_ref(bnb_absmax, rounding="bnb_cpu_lut")
    assert torch.equal(q, bnb_dq_state.absmax)
    assert_bitwise_equal(nested_absmax, bnb_dq_state.state2.absmax, "nested absmax")
    assert_bitwise_equal(nested_offset, bnb_dq_state.offset.reshape(()), "nested_offset")

    # bitsandbytes' stored constants -> our dequantization == bitsandbytes' (pure-torch) dequantization.
    for out_dtype in K.FLOAT_DTYPES:
        for state in (bnb_state, bnb_dq_state):
            state.dtype = out_dtype
            nested = state.state2.absmax if state.nested else None
            ours = ops._dequantize_4bit_torch(
                bnb_packed, state.absmax, nested, state.offset, x.shape, out_dtype, blocksize, quant_type
            )
            assert_bitwise_equal(ours, bnb_dequantize_pure_torch(bnb_packed, state, out_dtype), "dequant of bnb state")
            if native_dequant_runs(x.shape, blocksize) and not native_dequant_has_avx512_bug(x.shape, blocksize):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    native = F.dequantize_4bit(bnb_packed, state)
                # native FP4 gives -0.0 where the code table says +0.0 (quirk test below): adding +0.0
                # maps -0.0 to +0.0 and leaves every other value's bits alone
                assert_bitwise_equal(ours.reshape(-1), native.reshape(-1) + 0.0, "native dequant")


@pytest.mark.parametrize("chunk", range(8))
def test_reference_matches_bitsandbytes_on_random_cases(chunk):
    """Many random shapes, dtypes, blocksizes and value distributions (50 per chunk, 400 in all)."""
    for seed in range(chunk * 50, (chunk + 1) * 50):
        x, blocksize, quant_type, distribution = random_case(seed)
        try:
            check_against_bnb(x, blocksize, quant_type)
        except AssertionError as err:
            raise AssertionError(
                f"seed {seed}: shape {tuple(x.shape)} {x.dtype} bs {blocksize} {quant_type} {distribution}: {err}"
            ) from err


@pytest.mark.slow
def test_reference_matches_bitsandbytes_on_many_large_cases():
    for seed in range(10_000, 10_300):
        x, blocksize, quant_type, distribution = random_case(seed, max_elements=400_000)
        check_against_bnb(x, blocksize, quant_type)


def test_full_blocks_match_bitsandbytes_including_double_quant_bytes():
    """With no partial block and no zero block there is no quirk: everything matches (nearest aside)."""
    x = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)).bfloat16()
    ours = api.quantize(x, 64, double_quant=False, backend="torch")
    bnb_packed, bnb_state = bnb_quantize(x, 64, "nf4", double_quant=False)
    assert torch.equal(ours.packed, bnb_packed) and torch.equal(ours.absmax, bnb_state.absmax)


# ---------------------------------------------------------------------------------------------------
# The documented quirks, one test each
# ---------------------------------------------------------------------------------------------------


def find_division_quirk_value(absmax: float) -> float:
    """A value x with |x| < absmax whose NF4 code differs between x / absmax and x * (1 / absmax)."""
    am = torch.tensor(absmax, dtype=torch.float32)
    for threshold in K.thresholds("nf4"):
        x = torch.tensor(threshold, dtype=torch.float32) * am
        for _ in range(8):
            x = torch.nextafter(x, torch.tensor(-10.0))
        for _ in range(16):
            if codes_by_division(x[None], absmax, "nf4") != torch.bucketize(
                (x * (1.0 / am))[None], torch.tensor(K.thresholds("nf4"))
            ):
                return x.item()
            x = torch.nextafter(x, torch.tensor(10.0))
    raise AssertionError(f"no value near a threshold differs for absmax {absmax}")


def test_quirk_bnb_divides_in_the_partial_last_block():
    absmax = 0.7712345
    x_value = find_division_quirk_value(absmax)
    # Same value in a full block and in the partial tail block (blocksize 32, n = 32 + 2).
    x = torch.zeros(34)
    x[0], x[1], x[32], x[33] = absmax, x_value, absmax, x_value
    bnb_codes = unpack(bnb_quantize(x, 32, "nf4", False)[0], 34)
    ours = unpack(K.quantize_4bit_ref(x, 32)[0], 34)
    assert bnb_codes[1] == ours[1] == ours[33]  # full block: reciprocal-multiply, like ours
    assert bnb_codes[33] != ours[33]  # tail block: bnb divides
    assert abs(int(bnb_codes[33]) - int(ours[33])) == 1


def test_quirk_bnb_all_zero_tail_block_absmax_is_1e38():
    x = torch.randn(100)
    x[64:] = 0.0
    bnb_packed, state = bnb_quantize(x, 64, "nf4", False)
    packed, absmax = K.quantize_4bit_ref(x, 64)
    assert state.absmax[-1].item() == BNB_ZERO_TAIL_ABSMAX and absmax[-1].item() == 0.0
    assert torch.equal(bnb_packed, packed)  # codes agree (all the code of 0.0)
    ours = K.dequantize_4bit_ref(packed, absmax, (100,), torch.float32, 64)
    theirs = bnb_dequantize_pure_torch(bnb_packed, state, torch.float32)
    assert torch.equal(ours, theirs) and not ours.isnan().any()


def test_quirk_bnb_cpu_nested_codes_are_a_lookup_table_not_exact_nearest():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    _, state = bnb_quantize(x, 64, "nf4", True)
    absmax = K.quantize_4bit_ref(x, 64)[1]
    nearest = K.double_quantize_ref(absmax, "nearest")[0]
    lut = K.double_quantize_ref(absmax, "bnb_cpu_lut")[0]
    assert torch.equal(lut, state.absmax)
    differ = nearest != state.absmax
    assert 0 < int(differ.sum()) < 0.02 * differ.numel()  # ~0.3 % documented
    # near 0 the map is dense and a LUT bin can skip codes, but never by more than the map's widest gap
    dyn = K.dynamic_map()
    assert ((dyn[nearest.long()] - dyn[state.absmax.long()]).abs() <= dyn.diff().max()).all()


@pytest.mark.skipif(not HAS_AVX512, reason="the native-dequant bug is specific to AVX-512 CPUs")
def test_quirk_bnb_native_avx512_dequant_indexes_absmax_per_row():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    assert native_dequant_has_avx512_bug(x.shape, 64)
    packed, state = bnb_quantize(x, 64, "nf4", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = F.dequantize_4bit(packed, state)
    safe = bnb_dequantize_pure_torch(packed, state, torch.float32)
    ours = K.dequantize_4bit_ref(packed, state.absmax, (3, 96), torch.float32, 64)
    assert torch.equal(ours, safe)
    assert not torch.equal(native.reshape(-1), safe.reshape(-1))


def test_quirk_bnb_native_dequant_returns_1d_even_shapes_as_rows():
    x = torch.randn(128)
    packed, state = bnb_quantize(x, 64, "nf4", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = F.dequantize_4bit(packed, state)
    assert native.shape == (1, 128)
    assert torch.equal(native.reshape(-1), K.dequantize_4bit_ref(packed, state.absmax, (128,), torch.float32, 64))


def test_quirk_bnb_native_fp4_dequant_gives_negative_zero_for_code_8():
    # 0 < s <= 0.0026 is code 8 on bnb's CPU path; its native kernel (scalar path, odd row length / 2)
    # then returns -0.0 where the FP4 table and the pure-torch path give +0.0.
    x = torch.randn(97, 62, generator=torch.Generator().manual_seed(4)) * 1e-3
    x[:, 0] = 1.0
    packed, state = bnb_quantize(x, 64, "fp4", False)
    code_8 = unpack(packed, x.numel()) == 8
    assert code_8.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = F.dequantize_4bit(packed, state).reshape(-1)
    pure = bnb_dequantize_pure_torch(packed, state, torch.float32).reshape(-1)
    ours = K.dequantize_4bit_ref(packed, state.absmax, (97 * 62,), torch.float32, 64, "fp4")
    assert_bitwise_equal(ours, pure)
    assert torch.equal(native, ours)  # equal values ...
    assert torch.signbit(native[code_8]).all() and not torch.signbit(ours[code_8]).any()  # ... but -0.0


# ---------------------------------------------------------------------------------------------------
# Our constants -> bitsandbytes' dequantization, and serialization through bitsandbytes' loaders
# ---------------------------------------------------------------------------------------------------


def bnb_state_from_ours(qw: api.NF4Weight, prefix: str = "weight"):
    sd = qw.to_bnb_state_dict(prefix)
    stats = {k: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return sd[prefix], F.QuantState.from_dict(stats, torch.device("cpu"))


@pytest.mark.parametrize(
    "shape, blocksize, quant_type, dtype, double_quant",
    [
        ((64, 256), 64, "nf4", torch.bfloat16, True),
        ((33, 70), 32, "nf4", torch.float16, True),
        ((5000,), 4096, "fp4", torch.float32, False),
        ((3, 5, 300), 256, "nf4", torch.float32, False),
        ((40, 128), 128, "fp4", torch.bfloat16, True),
    ],
)
def test_bitsandbytes_dequantizes_our_state_like_we_do(shape, blocksize, quant_type, dtype, double_quant):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    qw = api.quantize(x, blocksize, double_quant, quant_type, backend="torch")
    packed, state = bnb_state_from_ours(qw)
    assert state.nested == double_quant and state.shape == x.shape and state.dtype == dtype
    for out_dtype in K.FLOAT_DTYPES:
        state.dtype = out_dtype
        ours = api.dequantize(qw, out_dtype)
        assert_bitwise_equal(bnb_dequantize_pure_torch(packed, state, out_dtype), ours, "bnb dequant of our state")
        if native_dequant_runs(shape, blocksize) and not native_dequant_has_avx512_bug(shape, blocksize):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                native = F.dequantize_4bit(packed, state)
            assert_bitwise_equal(native.reshape(shape) + 0.0, ours, "native bnb dequant of our state")


def make_bnb_linear(
    in_features: int, out_features: int, quant_type: str, double_quant: bool, quant_storage=torch.uint8
):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).bfloat16() * 0.05
    layer = Linear4bit(
        in_features, out_features, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
        compress_statistics=double_quant, quant_storage=quant_storage,
    )  # fmt: skip
    layer.weight = Params4bit(
        weight,
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        quant_storage=quant_storage,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer.to("cpu")  # quantizes on CPU


@pytest.mark.parametrize("quant_type, double_quant, quant_storage", [
    ("nf4", True, torch.uint8), ("nf4", False, torch.uint8), ("fp4", True, torch.uint8), ("nf4", True, torch.bfloat16),
])  # fmt: skip
def test_bnb_linear4bit_state_dict_loads_into_nf4weight(quant_type, double_quant, quant_storage):
    layer = make_bnb_linear(192, 64, quant_type, double_quant, quant_storage)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    qw = api.NF4Weight.from_bnb_state_dict(sd)
    assert qw.double_quant == double_quant and qw.shape == (64, 192) and qw.dtype == torch.bfloat16
    state = layer.weight.quant_state
    assert torch.equal(qw.packed, layer.weight.data.view(torch.uint8).reshape(-1, 1))
    for out_dtype in K.FLOAT_DTYPES:
        state.dtype = out_dtype
        assert_bitwise_equal(
            api.dequantize(qw, out_dtype), bnb_dequantize_pure_torch(layer.weight.data, state, out_dtype)
        )


def test_our_state_dict_loads_through_params4bit_from_prequantized(tmp_path):
    from safetensors import torch as safetensors

    x = torch.randn(64, 320, generator=torch.Generator().manual_seed(2)).bfloat16()
    qw = api.quantize(x, 64, double_quant=True)
    path = tmp_path / "w.safetensors"
    safetensors.save_file(qw.to_bnb_state_dict("layer.weight"), str(path))
    loaded = safetensors.load_file(str(path))
    stats = {k: v for k, v in loaded.items() if k.startswith("layer.weight.")}
    param = Params4bit.from_prequantized(loaded["layer.weight"], stats, device="cpu")
    state = param.quant_state
    assert state.nested and state.blocksize == 64 and state.quant_type == "nf4" and state.shape == (64, 320)
    assert_bitwise_equal(bnb_dequantize_pure_torch(param.data, state, torch.bfloat16), api.dequantize(qw))
    # and the same file back into lowrank
    again = api.NF4Weight.from_bnb_state_dict(loaded, "layer.weight")
    assert_bitwise_equal(api.dequantize(again), api.dequantize(qw))


def test_bnb_state_after_cpu_inference_has_bf16_nested_dtype_and_we_match_it():
    """bitsandbytes re-quantizes the constants in bf16 after a CPU no-grad forward, and its state dict then
    says ``"nested_dtype": "bfloat16"`` with a bf16 offset -- the variant transformers saves (docs/nf4.md, quirk 5)."""
    layer = make_bnb_linear(128, 64, "nf4", True)
    layer.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(torch.randn(2, 128).bfloat16())
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
    assert blob["nested_dtype"] == "bfloat16"
    qw = api.NF4Weight.from_bnb_state_dict(sd)
    assert qw.nested_dtype == torch.bfloat16
    state = F.QuantState.from_dict(
        {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}, torch.device("cpu")
    )
    for out_dtype in K.FLOAT_DTYPES:
        state.dtype = out_dtype
        expected = bnb_dequantize_pure_torch(sd["weight"], state, out_dtype)
        for backend in ("torch", "triton"):
            assert_bitwise_equal(api.dequantize(qw, out_dtype, backend=backend), expected, f"{backend} {out_dtype}")
    # the variant survives our serialization and bitsandbytes' loader reads ours the same way
    packed, state_from_ours = bnb_state_from_ours(qw)
    assert state_from_ours.state2.dtype == torch.bfloat16
    assert_bitwise_equal(bnb_dequantize_pure_torch(packed, state_from_ours, torch.bfloat16), api.dequantize(qw))


@pytest.mark.parametrize("nested_dtype", ["bfloat16", "float16"])
def test_nested_dtype_rounding_matches_bitsandbytes_for_any_offset(nested_dtype):
    """A blob naming bf16/fp16 with an offset that is not representable in that dtype."""
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(9)) * 0.03
    qw = api.quantize(x, 64, double_quant=True)
    sd = qw.to_bnb_state_dict()
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
    blob["nested_dtype"] = nested_dtype
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    ours = api.NF4Weight.from_bnb_state_dict(sd)
    state = F.QuantState.from_dict(
        {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}, torch.device("cpu")
    )
    expected = bnb_dequantize_pure_torch(sd["weight"], state, torch.float32)
    assert_bitwise_equal(api.dequantize(ours), expected)
    assert_bitwise_equal(api.dequantize(ours, backend="triton"), expected)
    assert not torch.equal(api.dequantize(ours), api.dequantize(qw))  # the rounding is visible


def test_transformers_save_pretrained_checkpoint_loads_into_nf4weight(tmp_path):
    import transformers
    from safetensors import torch as safetensors

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    quant_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "dense", quantization_config=quant_config, device_map="cpu", dtype=torch.bfloat16
        )
        model.save_pretrained(tmp_path / "q")
    sd = safetensors.load_file(str(tmp_path / "q" / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj.weight"
    qw = api.NF4Weight.from_bnb_state_dict(sd, prefix)
    layer_weight = model.model.layers[0].self_attn.q_proj.weight
    assert_bitwise_equal(
        api.dequantize(qw), bnb_dequantize_pure_torch(layer_weight.data, layer_weight.quant_state, torch.bfloat16)
    )


# ---------------------------------------------------------------------------------------------------
# Round-trip error statistics
# ---------------------------------------------------------------------------------------------------

# bitsandbytes' own expectation (tests/test_functional.py::test_4bit_quant, NF4, blocksize 64,
# randn(1024, 1024)): mean abs error 0.072798 (std 7.4e-5), mean rel error 0.203339 (std 3.4e-4),
# asserted within 7 standard deviations (docs/nf4.md, "Round-trip statistics").
BNB_PUBLISHED_NF4_BS64 = {"abs_mean": 0.072798, "abs_std": 7.4e-5, "rel_mean": 0.203339, "rel_std": 3.4e-4}
SIGMAS = 7


def roundtrip_errors(seed, blocksize, quant_type, double_quant, backend="torch"):
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(seed))
    qw = api.quantize(a, blocksize, double_quant, quant_type, backend=backend)
    err = (a - api.dequantize(qw, torch.float32, backend=backend)).abs()
    return err.mean().item(), (err / (a.abs() + 1e-8)).mean().item()


def load_stats() -> dict:
    with open(STATS_FILE) as f:
        return json.load(f)["stats"]


def test_roundtrip_error_nf4_bs64_matches_bitsandbytes_published_figures():
    abs_err, rel_err = roundtrip_errors(1234, 64, "nf4", False)
    published = BNB_PUBLISHED_NF4_BS64
    assert abs(abs_err - published["abs_mean"]) <= SIGMAS * published["abs_std"]
    assert abs(rel_err - published["rel_mean"]) <= SIGMAS * published["rel_std"]
    measured = load_stats()["nf4/bs64/plain"]
    assert abs(measured["abs_mean"] - published["abs_mean"]) <= SIGMAS * published["abs_std"]


@pytest.mark.parametrize(
    "key", ["nf4/bs64/dq", "nf4/bs32/plain", "nf4/bs256/dq", "nf4/bs1024/plain", "nf4/bs4096/dq", "fp4/bs64/plain"]
)
def test_roundtrip_error_within_k_sigma_of_committed_measurements(key):
    quant_type, bs, mode = key.split("/")
    stats = load_stats()[key]
    abs_err, rel_err = roundtrip_errors(1234, int(bs[2:]), quant_type, mode == "dq")
    assert abs(abs_err - stats["abs_mean"]) <= SIGMAS * stats["abs_std"], (abs_err, stats)
    assert abs(rel_err - stats["rel_mean"]) <= SIGMAS * stats["rel_std"], (rel_err, stats)


def test_roundtrip_error_grows_with_blocksize_and_bitsandbytes_gives_the_same_error():
    stats = load_stats()
    abs_means = [stats[f"nf4/bs{bs}/plain"]["abs_mean"] for bs in K.BLOCKSIZES]
    assert abs_means == sorted(abs_means)
    for bs in K.BLOCKSIZES:  # double quantization costs a little accuracy, never much
        plain, dq = stats[f"nf4/bs{bs}/plain"]["abs_mean"], stats[f"nf4/bs{bs}/dq"]["abs_mean"]
        assert plain <= dq <= plain * 1.01
    a = torch.randn(256, 1024, generator=torch.Generator().manual_seed(7))
    packed, state = bnb_quantize(a, 64, "nf4", False)
    bnb_err = (a - bnb_dequantize_pure_torch(packed, state, torch.float32)).abs().mean()
    ours_err = (a - api.dequantize(api.quantize(a, 64, double_quant=False))).abs().mean()
    assert torch.equal(bnb_err, ours_err)
