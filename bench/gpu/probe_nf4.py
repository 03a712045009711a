"""One-off GPU probe: NF4 Triton kernels vs the torch reference on CUDA (bit-exact), and dequant
timing variants against the measured copy bandwidth. Prints JSON lines."""

import json

import torch
import triton
from lowrank.kernels import nf4 as K

import lowrank

dev = torch.device("cuda")
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}))
torch.manual_seed(0)
# correctness
bad = []
for shape, bs, qt, dt in [
    ((4096, 4096), 64, "nf4", torch.bfloat16),
    ((1023, 77), 32, "nf4", torch.float16),
    ((5, 300), 256, "fp4", torch.float32),
    ((3, 5, 4097), 4096, "nf4", torch.bfloat16),
    ((11008, 4096), 64, "nf4", torch.bfloat16),
    ((129,), 128, "fp4", torch.bfloat16),
]:
    w = torch.randn(shape, device=dev).to(dt)
    w.view(-1)[:bs] = 0
    a = lowrank.quantize(w, bs, True, qt, backend="torch")
    b = lowrank.quantize(w, bs, True, qt, backend="triton")
    same_q = [torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True)]
    for odt in (torch.bfloat16, torch.float32):
        d1 = lowrank.dequantize(a, odt, backend="torch")
        d2 = lowrank.dequantize(a, odt, backend="triton")
        ok = torch.equal(
            d1.view(-1).view(torch.uint8) if odt != torch.float32 else d1.view(-1).view(torch.int32),
            d2.view(-1).view(torch.uint8) if odt != torch.float32 else d2.view(-1).view(torch.int32),
        )
        print(
            json.dumps(
                {"check": [list(shape), bs, qt, str(dt), str(odt)], "quant_equal": same_q, "dequant_bitexact": ok}
            )
        )
        if not (all(same_q) and ok):
            bad.append(shape)
    # vs CPU reference (device independence of everything except the mean)
    c = lowrank.quantize(w.cpu(), bs, True, qt, backend="torch")
    print(
        json.dumps(
            {
                "cpu_vs_cuda_packed": torch.equal(c.packed, b.packed.cpu()),
                "absmax_codes_equal": torch.equal(c.absmax, b.absmax.cpu()),
                "offset_equal": torch.equal(c.nested_offset, b.nested_offset.cpu()),
            }
        )
    )


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / (t * 1e-3) / 1e9


def dequantize_launch(q, out, n, bpp, warps):
    """A call of the dequantize kernel with ``bpp`` bytes per program and ``warps`` warps."""
    grid = (triton.cdiv((n + 1) // 2, bpp),)
    return lambda: K._dequantize_4bit_kernel[grid](
        q.packed,
        q.absmax,
        q.nested_absmax,
        q.nested_offset.reshape(1),
        K._device_table("dynamic", dev),
        K._device_table("nf4", dev),
        out,
        n,
        BLOCKSIZE=64,
        BYTES_PER_PROGRAM=bpp,
        DOUBLE_QUANT=True,
        num_warps=warps,
        enable_fp_fusion=False,
    )


copy_bw = copy_bandwidth()
print(json.dumps({"copy_GBps": copy_bw}))
for N, Kd in [(4096, 4096), (4096, 14336), (8192, 28672)]:
    w = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16)
    q = lowrank.quantize(w, 64, True, "nf4", backend="triton")
    n = N * Kd
    nbytes = q.nbytes + 2 * n
    out = torch.empty(N, Kd, dtype=torch.bfloat16, device=dev)
    for bpp in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8):
            try:
                t = triton.testing.do_bench(dequantize_launch(q, out, n, bpp, warps), warmup=25, rep=100)
            except Exception as e:
                print(json.dumps({"shape": [N, Kd], "bpp": bpp, "warps": warps, "error": str(e)[:200]}))
                continue
            print(
                json.dumps(
                    {
                        "shape": [N, Kd],
                        "bpp": bpp,
                        "warps": warps,
                        "us": t * 1e3,
                        "GBps": nbytes / (t * 1e-3) / 1e9,
                        "frac_copy": nbytes / (t * 1e-3) / 1e9 / copy_bw,
                    }
                )
            )
    t = triton.testing.do_bench(lambda q=q: lowrank.dequantize(q, torch.bfloat16), warmup=25, rep=100)
    print(json.dumps({"shape": [N, Kd], "public_api_us": t * 1e3}))
    tq = triton.testing.do_bench(lambda w=w: lowrank.quantize(w, 64, True, "nf4", backend="triton"), warmup=5, rep=50)
    print(json.dumps({"shape": [N, Kd], "quantize_dq_us": tq * 1e3, "GBps": (2 * n + q.nbytes) / (tq * 1e-3) / 1e9}))
    a = torch.mm(torch.randn(16, Kd, device=dev, dtype=torch.bfloat16), w.t())
print(json.dumps({"bad": [list(s) for s in bad]}))
