"""The four ``torch.ops.lowrank`` 4-bit ops: ``opcheck`` (schema, fake tensors, autograd registration) for
every usable backend, and ``torch.compile(fullgraph=True)`` over quantize/dequantize."""

from __future__ import annotations

import pytest
import torch
from lowrank.kernels import nf4 as K

import lowrank
from lowrank.ops import dispatch
from lowrank.ops import nf4 as ops  # noqa: F401  (registers the ops)


def backends(op: str) -> list[str]:
    return dispatch.usable_backends(op, "cpu")


def sample(shape=(12, 70), blocksize=64, double_quant=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    return x, lowrank.quantize(x, blocksize, double_quant, backend="torch")


@pytest.mark.parametrize("backend", backends("quantize_4bit"))
def test_opcheck_quantize_4bit(backend):
    x, _ = sample()
    for args in [(x, 64, "nf4", backend), (x.t(), 32, "fp4", backend), (x.float()[:1, :3], 4096, "nf4", backend)]:
        torch.library.opcheck(torch.ops.lowrank.quantize_4bit.default, args)


@pytest.mark.parametrize("backend", backends("double_quantize"))
def test_opcheck_double_quantize(backend):
    for nb in (1, 300):
        absmax = torch.rand(nb, generator=torch.Generator().manual_seed(nb)) + 0.1
        torch.library.opcheck(torch.ops.lowrank.double_quantize.default, (absmax, backend))


@pytest.mark.parametrize("backend", backends("double_dequantize"))
def test_opcheck_double_dequantize(backend):
    _, qw = sample()
    for nested_dtype in K.NESTED_DTYPES:
        torch.library.opcheck(
            torch.ops.lowrank.double_dequantize.default,
            (qw.absmax, qw.nested_absmax, qw.nested_offset, backend, nested_dtype),
        )


@pytest.mark.parametrize("backend", backends("dequantize_4bit"))
def test_opcheck_dequantize_4bit(backend):
    x, qw = sample()
    _, plain = sample(double_quant=False)
    shape = list(x.shape)
    for args in [
        (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, shape, torch.bfloat16, 64, "nf4", backend),
        (
            qw.packed,
            qw.absmax,
            qw.nested_absmax,
            qw.nested_offset,
            shape,
            torch.float32,
            64,
            "nf4",
            backend,
            torch.bfloat16,
        ),
        (plain.packed, plain.absmax, None, None, shape, torch.float16, 64, "nf4", backend),
    ]:
        torch.library.opcheck(torch.ops.lowrank.dequantize_4bit.default, args)


def test_backward_through_quantization_raises_instead_of_being_silently_wrong():
    x, _ = sample()
    packed, absmax = torch.ops.lowrank.quantize_4bit(x.float().requires_grad_(), 64, "nf4", "torch")
    assert not packed.requires_grad
    with pytest.raises(RuntimeError, match="(?i)autograd"):
        absmax.sum().backward()


def test_torch_compile_fullgraph_quantize_dequantize():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def round_trip(w):
        packed, absmax = torch.ops.lowrank.quantize_4bit(w, 64, "nf4", "torch")
        qabsmax, nested_absmax, nested_offset = torch.ops.lowrank.double_quantize(absmax, "torch")
        return torch.ops.lowrank.dequantize_4bit(
            packed, qabsmax, nested_absmax, nested_offset, list(w.shape), torch.bfloat16, 64, "nf4", "torch"
        )

    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    expected = lowrank.dequantize(lowrank.quantize(x, backend="torch"), torch.bfloat16, backend="torch")
    assert torch.equal(round_trip(x).view(torch.int16), expected.view(torch.int16))


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_dequantize():
    _, qw = sample()

    @torch.compile(fullgraph=True)
    def dq(packed, absmax, nested_absmax, nested_offset):
        out = torch.ops.lowrank.dequantize_4bit(
            packed, absmax, nested_absmax, nested_offset, [12, 70], torch.float32, 64, "nf4", "torch"
        )
        return out * 2

    expected = lowrank.dequantize(qw, torch.float32, backend="torch") * 2
    assert torch.equal(dq(qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset), expected)


def test_torch_compile_fullgraph_public_dequantize():
    torch._dynamo.reset()
    _, qw = sample()
    compiled = torch.compile(
        lambda w: lowrank.dequantize(w, torch.float32, backend="torch") * 2, fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(qw), lowrank.dequantize(qw, torch.float32, backend="torch") * 2)


def test_torch_compile_fullgraph_automatic_backend():
    # The automatic choice probes the C++ extension; that probe must be traceable (no import at trace time).
    torch._dynamo.reset()
    _, qw = sample()
    compiled = torch.compile(lambda w: lowrank.dequantize(w, torch.float32) * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(qw), lowrank.dequantize(qw, torch.float32) * 2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("n", [255, 256, 257, 1000, 4097])
def test_torch_backend_quantizes_in_whole_block_chunks_with_the_same_bits(monkeypatch, n, blocksize, quant_type):
    from lowrank.kernels import nf4 as K

    from lowrank.ops import nf4 as ops_nf4

    monkeypatch.setattr(ops_nf4, "QUANTIZE_CHUNK_ELEMENTS", 256)  # several chunks, a partial last one
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    packed, absmax = ops_nf4._quantize_4bit_torch(x, blocksize, quant_type)
    want_packed, want_absmax = K.quantize_4bit_ref(x, blocksize, quant_type)
    assert torch.equal(packed, want_packed) and packed.shape == want_packed.shape
    assert torch.equal(absmax, want_absmax)
