"""One-off GPU check of the LoRA op: correctness of the torch/triton backends on CUDA under the tolerance rule
of tests/README.md (2x PyTorch's error at the same precision), torch.compile(fullgraph) with inductor, and
fwd+bwd timings; one JSON object per line. Needs an installed lowrank: ``bash scripts/setup.sh``, or on a
machine that already has torch and triton, ``python -m pip install --no-deps --no-build-isolation -e .``:

    python scripts/gpu_lora_check.py          # DEV=cpu for a tiny logic check without a GPU
"""

import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from lowrank.nf4 import dequantize, quantize
from lowrank.nn import LinearNF4, LoRALinear
from lowrank.ops import dispatch, lora_linear_multi, lora_linear_nf4

dev = os.environ.get("DEV", "cuda")
big = dev == "cuda"
print(
    json.dumps(
        {
            "device": torch.cuda.get_device_name() if big else "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "backends": dispatch.usable_backends("lora_forward", dev),
        }
    ),
    flush=True,
)
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # the rule's atol (tests/README.md)
K, N, R = (1000, 700, 16) if big else (96, 40, 5)
gen = torch.Generator().manual_seed(0)
W = torch.randn(N, K, generator=gen) * 0.05
qw = quantize(W.to(dev), 64, True, backend="torch")
dense = dequantize(qw, torch.float32, backend="torch").double()
A0 = (torch.randn(R, K, generator=gen) * 0.05).to(dev)
B0 = (torch.randn(N, R, generator=gen) * 0.05).to(dev)
bias0 = torch.randn(N, generator=gen).to(dev)


def peft(x, A, B, b, dtype, s):
    x = x.detach().to(dtype).requires_grad_(True)
    A = A.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    B = B.detach().to(A.dtype).requires_grad_(True)
    y = F.linear(x, dense.to(dtype), b.to(dtype)) + (s * F.linear(F.linear(x.to(A.dtype), A), B)).to(dtype)
    g = torch.linspace(-1, 1, y.numel(), device=dev, dtype=torch.float64).reshape(y.shape).to(dtype)
    (y * g).sum().backward()
    return [y, x.grad, A.grad, B.grad]


worst = {}
for backend in ("torch", "triton"):
    for dtype in (torch.bfloat16, torch.float16):
        for M in (1, 16, 67, 512) if big else (3,):
            x = torch.randn(M, K, generator=gen).to(dev).to(dtype)
            xs, As, Bs = (
                x.clone().requires_grad_(True),
                A0.clone().requires_grad_(True),
                B0.clone().requires_grad_(True),
            )
            y = lora_linear_nf4(xs, qw, As, Bs, 2.0, bias0.to(dtype), backend=backend)
            g = torch.linspace(-1, 1, y.numel(), device=dev, dtype=torch.float64).reshape(y.shape).to(dtype)
            (y * g).sum().backward()
            ref = peft(x, A0.double(), B0.double(), bias0.double(), torch.float64, 2.0)
            same = peft(x, A0, B0, bias0, dtype, 2.0)
            ratios = []
            for o, s_, r in zip([y, xs.grad, As.grad, Bs.grad], same, ref, strict=True):
                err = (o.double() - r).abs().max().item()
                bound = 2 * (s_.double() - r).abs().max().item() + ATOL[dtype]
                ratios.append(round(err / bound, 3))
            ok = max(ratios) <= 1
            print(json.dumps({"check": [backend, str(dtype), M], "err_over_bound": ratios, "ok": ok}), flush=True)

# dropout + multi on triton
x = torch.randn(67, K, generator=gen).to(dev).to(torch.bfloat16)
outs = {}
for backend in ("torch", "triton"):
    As = A0.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    ys = lora_linear_multi(
        xs, [(qw, As, B0, 2.0, None), (qw, As, B0, 1.0, bias0.bfloat16())], dropout=0.1, backend=backend, dropout_seed=5
    )
    (ys[0].float().sum() + ys[1].float().square().mean()).backward()
    outs[backend] = (ys[0].float(), ys[1].float(), xs.grad.float(), As.grad)
print(
    json.dumps(
        {
            "multi_dropout_triton_vs_torch_maxdiff": [
                round((a - b).abs().max().item(), 5) for a, b in zip(outs["torch"], outs["triton"], strict=True)
            ]
        }
    ),
    flush=True,
)

# torch.compile fullgraph (inductor) on a LoRALinear
layer = LoRALinear(LinearNF4(qw, bias0.clone()), R, 32, dropout=0.0, backend="triton")
with torch.no_grad():
    layer.lora_B.normal_(0, 0.05)
comp = torch.compile(layer, fullgraph=True)
x = torch.randn(4, 33, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
t0 = time.time()
yc = comp(x)
yc.float().sum().backward()
gc = (x.grad.clone(), layer.lora_A.grad.clone())
x.grad = None
layer.lora_A.grad = None
ye = layer(x)
ye.float().sum().backward()
print(
    json.dumps(
        {
            "compile_fullgraph_s": round(time.time() - t0, 1),
            "y_maxdiff": (yc - ye).abs().max().item(),
            "dx_maxdiff": (gc[0] - x.grad).abs().max().item(),
            "dA_maxdiff": (gc[1] - layer.lora_A.grad).abs().max().item(),
        }
    ),
    flush=True,
)

if big:  # timings: fwd+bwd of one 4096x4096 NF4 LoRA linear, bf16, r=16
    Kt = Nt = 4096
    wt = torch.randn(Nt, Kt, device=dev) * 0.02
    qt = quantize(wt, 64, True, backend="triton")
    At = (torch.randn(16, Kt, device=dev) * 0.01).requires_grad_(True)
    Bt = (torch.randn(Nt, 16, device=dev) * 0.01).requires_grad_(True)
    wd = wt.bfloat16()
    for M in (16, 2048, 8192):
        xt = torch.randn(M, Kt, device=dev, dtype=torch.bfloat16, requires_grad=True)
        res = {"M": M}
        for name, fn in [
            ("torch", lambda xt=xt: lora_linear_nf4(xt, qt, At, Bt, 2.0, backend="torch")),
            ("triton", lambda xt=xt: lora_linear_nf4(xt, qt, At, Bt, 2.0, backend="triton")),
            (
                "dense_bf16_peft_style",
                lambda xt=xt: F.linear(xt, wd) + (2.0 * F.linear(F.linear(xt.float(), At), Bt)).bfloat16(),
            ),
        ]:

            def step(fn=fn):
                y = fn()
                y.backward(torch.ones_like(y))

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = triton.testing.do_bench(step, warmup=10, rep=50)
            res[name + "_ms"] = round(ms, 3)
            res[name + "_peak_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        print(json.dumps(res), flush=True)
