"""Measure NF4/FP4 round-trip error statistics and write them to tests/data/nf4_roundtrip_stats.json.

For each quant type, blocksize (32 ... 4096) and with/without double quantization, quantize
``randn(1024, 1024)`` (fp32, one seed per trial) with lowrank's reference backend, dequantize to fp32,
and record over the trials the mean and standard deviation of

    abs error = mean |A - A'|          rel error = mean |A - A'| / (|A| + 1e-8)

(the same statistics as bitsandbytes' ``tests/test_functional.py::test_4bit_quant``). The tests check a
fresh trial (a seed not used here) against mean +- k sigma. Run from the repository root:

    .venv/bin/python scripts/measure_roundtrip_stats.py [--trials 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from lowrank.kernels import nf4 as K

import lowrank
from lowrank import files

SHAPE = (1024, 1024)
OUTPUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "nf4_roundtrip_stats.json")


def roundtrip_errors(seed: int, blocksize: int, quant_type: str, double_quant: bool) -> tuple[float, float]:
    """(mean abs error, mean rel error) of one quantize -> dequantize round trip of randn(1024, 1024)."""
    a = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    qw = lowrank.quantize(a, blocksize, double_quant, quant_type, backend="torch")
    err = (a - lowrank.dequantize(qw, torch.float32, backend="torch")).abs()
    return err.mean().item(), (err / (a.abs() + 1e-8)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    started = time.time()
    stats = {}
    for quant_type in K.QUANT_TYPES:
        for blocksize in K.BLOCKSIZES:
            for double_quant in (False, True):
                trials = [roundtrip_errors(seed, blocksize, quant_type, double_quant) for seed in range(args.trials)]
                abs_err = torch.tensor([t[0] for t in trials], dtype=torch.float64)
                rel_err = torch.tensor([t[1] for t in trials], dtype=torch.float64)
                key = f"{quant_type}/bs{blocksize}/{'dq' if double_quant else 'plain'}"
                stats[key] = {
                    "abs_mean": abs_err.mean().item(),
                    "abs_std": abs_err.std().item(),
                    "rel_mean": rel_err.mean().item(),
                    "rel_std": rel_err.std().item(),
                }
                print(key, stats[key], flush=True)
    result = {
        "what": "round-trip error of lowrank.quantize/dequantize on randn(1024, 1024) fp32, seeds 0..trials-1",
        "script": "scripts/measure_roundtrip_stats.py",
        "shape": list(SHAPE),
        "trials": args.trials,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": round(time.time() - started, 1),
        "stats": stats,
    }
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    files.write_text(output, json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("wrote", output)


if __name__ == "__main__":
    main()
