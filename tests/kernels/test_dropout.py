"""Counter-based dropout masks (``lowrank.kernels.dropout``): the pure-torch reference, the Triton kernel and
the C++ extension (csrc/dropout.h) give the same bits; the keep fraction and independence are right; bad p
raises. The LoRA ops that use the mask are tested in tests/lowrank/ops/test_lora.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from lowrank.kernels import dropout as D

from lowrank import _ext

EXT = _ext.load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"C++ extension unavailable: {_ext.load_error()}")

SEEDS = [0, 1, 7, 2**31 + 3, 2**62 + 5, -3]
# (rows, cols, row_offset): odd K, M not a multiple of any tile, an offset, and an index range crossing 2^32
EXTENTS = [(67, 45, 0), (5, 333, 12), (3, 33, 2**32 // 33), (1, 1, 0)]
PS = [0.1, 0.5, 0.97]


def test_fmix32_is_murmur3s_finalizer():
    # MurmurHash3's published fmix32 values: the generator is the documented one, not a look-alike.
    assert D.fmix32(0) == 0
    assert D.fmix32(1) == 0x514E28B7
    h = torch.tensor([0, 1, 0xDEADBEEF, 0xFFFFFFFF], dtype=torch.int64)
    assert D._fmix32_ref(h).tolist() == [D.fmix32(int(v)) for v in h]


def test_reference_equals_the_scalar_definition():
    """dropout_keep_ref against the formula of the module docstring, written out on Python ints."""
    for seed in SEEDS:
        drop = D.Dropout(0.3, seed)
        key0, key1 = drop.keys
        s = seed % 2**64
        assert key0 == D.fmix32((s & D.MASK32) ^ D.KEY_SALT0)
        assert key1 == D.fmix32((s >> 32) ^ D.KEY_SALT1 ^ key0)
        index = [0, 1, 5, 2**32 - 1, 2**32, 2**40 + 17]
        want = [D.fmix32(D.fmix32((e & D.MASK32) ^ key0) ^ (e >> 32) ^ key1) >= drop.threshold for e in index]
        assert D.dropout_keep_ref(torch.tensor(index), drop).tolist() == want


def test_row_chunks_and_offsets_are_slices_of_one_mask():
    drop = D.Dropout(0.4, 11)
    whole = D.dropout_mask_ref(40, 37, drop)
    for m0, rows in ((0, 1), (3, 10), (39, 1)):
        assert torch.equal(D.dropout_mask_ref(rows, 37, drop, row_offset=m0), whole[m0 : m0 + rows])
    # element (m, k) has index m*K + k: a flat mask of the same elements is the same bits
    flat = D.dropout_keep_ref(torch.arange(40 * 37), drop)
    assert torch.equal(flat.reshape(40, 37), whole)


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,cols,row_offset", EXTENTS)
def test_triton_mask_equals_reference_bit_for_bit(rows, cols, row_offset, device):
    for seed in SEEDS:
        for p in PS:
            drop = D.Dropout(p, seed)
            got = D.dropout_mask(rows, cols, drop, row_offset, device=device)
            assert torch.equal(got.cpu(), D.dropout_mask_ref(rows, cols, drop, row_offset)), (seed, p)


@pytest.mark.interpreter
def test_triton_apply_zeroes_exactly_the_dropped_elements(device):
    drop = D.Dropout(0.25, 5)
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(9, 41, device=device).to(dtype) + 3.0  # no zeros of its own
        want = D.masked_rows_ref(t.cpu(), drop, row_offset=4)
        assert torch.equal(D.apply_dropout_(t, drop, row_offset=4).cpu(), want)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        D.apply_dropout_(torch.zeros(4, 6, device=device).t(), drop)


@needs_ext
@pytest.mark.parametrize("rows,cols,row_offset", EXTENTS)
def test_ext_mask_equals_reference_bit_for_bit(rows, cols, row_offset):
    for seed in SEEDS:
        for p in PS:
            drop = D.Dropout(p, seed)
            got = EXT.dropout_mask(rows, cols, drop, row_offset)
            assert torch.equal(got, D.dropout_mask_ref(rows, cols, drop, row_offset)), (seed, p)


@needs_ext
def test_ext_portable_path_equals_reference():
    """The same comparison with AVX-512 switched off (LOWRANK_EXT_NO_AVX512=1 in a fresh process)."""
    code = (
        "import torch; from lowrank import _ext; from lowrank.kernels import dropout as D\n"
        "E = _ext.load()\n"
        "for seed in (0, 2**62 + 5, -3):\n"
        "    for rows, cols, off in ((67, 45, 0), (3, 33, 2**32 // 33)):\n"
        "        d = D.Dropout(0.3, seed)\n"
        "        assert torch.equal(E.dropout_mask(rows, cols, d, off), D.dropout_mask_ref(rows, cols, d, off))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LOWRANK_EXT_NO_AVX512="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p):
    n = 1 << 20
    for seed in (3, 2**62 + 1):
        keep = D.dropout_keep_ref(torch.arange(n), D.Dropout(p, seed))
        frac = keep.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(frac - (1 - p)) < 5 * sigma, f"p={p} seed={seed}: kept {frac:.5f}, want {1 - p:.5f}"
    assert D.Dropout(p, 0).threshold == math.floor(p * 2**32)


def test_bits_are_independent_across_neighbours_rows_and_seeds():
    """Agreement rates of a p = 0.5 mask with itself shifted by one element, one row, and with the mask of
    seed + 1 (the next projection): all must be 1/2 within 5 sigma (a correlated generator fails one)."""
    rows, cols, p = 512, 1024, 0.5
    a = D.dropout_mask_ref(rows, cols, D.Dropout(p, 1234))
    b = D.dropout_mask_ref(rows, cols, D.Dropout(p, 1235))
    sigma = 0.5 / math.sqrt(a.numel() / 2)
    for name, u, v in (
        ("neighbour", a[:, 1:], a[:, :-1]),
        ("next row", a[1:], a[:-1]),
        ("seed + 1", a, b),
    ):
        agree = (u == v).double().mean().item()
        assert abs(agree - 0.5) < 5 * sigma, f"{name}: agreement {agree:.4f}"


def test_seed_is_taken_mod_2_64():
    assert torch.equal(
        D.dropout_mask_ref(4, 9, D.Dropout(0.5, -1)), D.dropout_mask_ref(4, 9, D.Dropout(0.5, 2**64 - 1))
    )
    assert D.Dropout(0.5, 2**64 - 1).seed_int64 == -1
    assert D.Dropout(0.5, 2**63).seed_int64 == -(2**63)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_p_raises_naming_the_value(p):
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got"):
        D.Dropout.of(p, 0)


def test_no_dropout_and_bad_seed():
    assert D.Dropout.of(0.0, 5) is None and D.Dropout.of(0, 5) is None
    with pytest.raises(TypeError, match="dropout seed must be an int, got float"):
        D.Dropout.of(0.1, 1.5)
    with pytest.raises(ValueError, match="rows must be a non-negative int"):
        D.dropout_mask_ref(-1, 3, D.Dropout(0.1, 0))


@needs_ext
def test_ext_rejects_bad_p():
    out = torch.empty(2, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"dropout must be a probability in \[0, 1\), got 1"):
        torch.ops.lowrank_ext.dropout_mask_out(out, 0, 1.0, 0)
