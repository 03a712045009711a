"""JIT-build ``lowrank._C`` with its CUDA kernels on this machine and put it where ``import lowrank._C`` finds it.

    python bench/gpu/build_ext_cuda.py --build-dir DIR --package-dir LRPATH/lowrank

bench/gpu/run.sh calls this before its tests, with the symlinked package it builds in ``$LRPATH``. No pip:
``torch.utils.cpp_extension.load`` compiles csrc/*.cpp and csrc/cuda/*.cu with setup.py's flags (ninja,
nvcc) into ``--build-dir``. The architectures come from TORCH_CUDA_ARCH_LIST, else this GPU's capability
only (one architecture builds faster). The library is then copied into ``--package-dir`` as
``_C<EXT_SUFFIX>`` (replacing an older ``_C*.so`` there), and a fresh interpreter checks that lowrank
loads it, sees the CUDA kernels, and that one small CUDA dequantization equals the torch reference.

Exit status: 0 built and checked; 1 the build or the check failed; 2 skipped (torch without CUDA, no GPU
or no nvcc), with the reason on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in a fresh interpreter on the installed package: lowrank must report the CUDA kernels and one
# double-quantized dequantization on the GPU must give the reference's bits.
CHECK = """
import torch
from lowrank import _ext
from lowrank.kernels import nf4 as K
assert _ext.cuda_kernels_built(), f"lowrank does not see the CUDA kernels: {_ext.load_error()}"
x = torch.randn(1000, 333, generator=torch.Generator().manual_seed(0))
packed, absmax = K.quantize_4bit_ref(x, 64, "nf4")
q, a2, off = K.double_quantize_ref(absmax)
ref = K.dequantize_4bit_ref(packed, K.double_dequantize_ref(q, a2, off), x.shape, torch.bfloat16, 64, "nf4")
cuda = [t.cuda() for t in (packed, q, a2, off)]
out = torch.ops.lowrank_ext.dequantize_4bit(*cuda, list(x.shape), torch.bfloat16, 64, "nf4", torch.float32)
same = torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))
print("lowrank._C from", _ext._import()[0].__file__, "| CUDA kernels: yes | bf16 dequantize bit-exact:", same)
raise SystemExit(0 if same else 1)
"""


def load_setup():
    """setup.py as a module (its setup() call runs only as __main__), for its flags and source lists."""
    spec = importlib.util.spec_from_file_location("lowrank_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skip_reason() -> str | None:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def install(library: pathlib.Path, package_dir: pathlib.Path) -> pathlib.Path:
    """Copy the library into package_dir as _C<EXT_SUFFIX>, removing older _C*.so entries there first."""
    if package_dir.resolve().is_relative_to((ROOT / "src").resolve()):
        raise SystemExit(f"--package-dir {package_dir} is inside the source tree; give the symlinked package dir")
    for old in package_dir.glob("_C*.so"):
        old.unlink()  # a symlink into the tree loses only the link, never its target
    target = package_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    # run.sh builds while tests already run: a process importing lowrank._C must see the whole file or none
    partial = package_dir / f".{target.name}.partial"
    shutil.copy2(library, partial)
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=pathlib.Path, required=True, help="where ninja builds (created)")
    parser.add_argument("--package-dir", type=pathlib.Path, required=True, help="the lowrank package to install into")
    args = parser.parse_args(argv)

    reason = skip_reason()
    if reason is not None:
        print(f"build_ext_cuda: skipped: {reason}")
        return 2
    import torch
    from torch.utils import cpp_extension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    setup = load_setup()
    sources = [str(p) for p in sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    args.build_dir.mkdir(parents=True, exist_ok=True)
    print(f"build_ext_cuda: torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc from {cpp_extension.CUDA_HOME}")
    print(f"build_ext_cuda: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, sources: {sources}")
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name="_C",  # the module init is PyInit__C (csrc/module.cpp)
            sources=sources,
            extra_cflags=setup.CXX_FLAGS,
            extra_cuda_cflags=setup.nvcc_flags(),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(ROOT / "csrc")],
            build_directory=str(args.build_dir),
            is_python_module=False,  # only build (and dlopen here); lowrank imports it as lowrank._C
            verbose=True,
        )
    except Exception as err:  # noqa: BLE001 - report any build failure and exit 1
        seconds = time.perf_counter() - start
        print(f"build_ext_cuda: the build failed after {seconds:.0f} s: {type(err).__name__}: {err}")
        return 1
    library = args.build_dir / "_C.so"
    print(f"build_ext_cuda: built {library} in {time.perf_counter() - start:.0f} s")
    target = install(library, args.package_dir)
    print(f"build_ext_cuda: installed as {target}")

    path = os.pathsep.join(filter(None, [str(args.package_dir.parent), os.environ.get("PYTHONPATH")]))
    check = subprocess.run(
        [sys.executable, "-c", CHECK],
        env={**os.environ, "PYTHONPATH": path},
        cwd=args.package_dir.parent,  # not the repository root: `lowrank` is the installed package
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(check.stdout + check.stderr[-3000:])
    if check.returncode != 0:
        print("build_ext_cuda: the installed extension failed its check")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
