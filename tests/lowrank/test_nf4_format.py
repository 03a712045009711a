"""lowrank.nf4_format: the format at the bottom of the import graph (no Triton) and NF4Weight's value
semantics (equality, copies, pickling, detaching)."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import subprocess
import sys

import pytest
import torch

import lowrank
from lowrank.nf4 import dequantize, quantize
from lowrank.nf4_format import TENSOR_FIELDS, NF4Weight, QuantStateError


def test_the_format_and_the_extension_adapter_validate_without_triton():
    # lowrank/__init__ re-exports the library (another concern); with the package as a bare namespace the
    # format module and the C++ adapter import neither Triton nor any kernel file.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('lowrank'); pkg.__path__ = {list(lowrank.__path__)!r}; sys.modules['lowrank'] = pkg\n"
        "import lowrank.nf4_format as F, lowrank._ext\n"
        "w = F.NF4Weight.empty((4, 64))\n"
        "try:\n"
        "    F.NF4Weight(w.packed[:-1], w.absmax, w.shape, w.dtype)\n"
        "except F.QuantStateError as err:\n"
        "    assert 'packed must be uint8 with 128 bytes' in str(err)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith('lowrank.kernels'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_equality_compares_metadata_and_values():
    w = torch.randn(10, 70)
    a, b = quantize(w), quantize(w.clone())
    assert a == b and not (a != b)
    assert a != quantize(w, double_quant=False)
    assert a != quantize(w + 1.0)
    assert a != dataclasses.replace(a, dtype=torch.bfloat16)
    assert a != "not a weight"
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)


def test_copies_and_pickles_are_equal_and_independent():
    a = quantize(torch.randn(33, 65), 32)
    for clone in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a)), a.clone()):
        assert clone == a and torch.equal(dequantize(clone), dequantize(a))
    deep = copy.deepcopy(a)
    assert all(getattr(deep, f).data_ptr() != getattr(a, f).data_ptr() for f in TENSOR_FIELDS)
    buffer = io.BytesIO()
    torch.save(a, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False) == a


def test_unpickling_validates():
    a = quantize(torch.randn(8, 64))
    raw = pickle.dumps(a)
    state = dict(vars(a), absmax=a.absmax[:-1])
    broken = NF4Weight.__new__(NF4Weight)
    with pytest.raises(QuantStateError, match="absmax must be torch.uint8 with 8 entries"):
        broken.__setstate__(state)
    assert pickle.loads(raw) == a


def test_quantize_of_a_tensor_that_requires_grad_detaches():
    w = torch.randn(16, 64, requires_grad=True)
    q = quantize(w * 2.0)  # a non-leaf with history
    assert all(not t.requires_grad and t.grad_fn is None for t in q.tensors().values())
    assert q == quantize((w * 2.0).detach())


def test_trusted_skips_checks_and_empty_builds_the_layout():
    a = quantize(torch.randn(8, 64))
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
    assert NF4Weight.trusted(**fields) == a
    NF4Weight.trusted(**{**fields, "absmax": a.absmax[:1]})  # no check: the caller vouches
    for double_quant in (True, False):
        skeleton = NF4Weight.empty((40, 96), torch.bfloat16, 64, "fp4", double_quant, device="meta")
        real = quantize(torch.randn(40, 96, dtype=torch.bfloat16), 64, double_quant, "fp4")
        for name in TENSOR_FIELDS:
            s, r = getattr(skeleton, name), getattr(real, name)
            assert (s is None) == (r is None)
            if s is not None:
                assert s.shape == r.shape and s.dtype == r.dtype and s.is_meta
