"""The CUDA kernels of csrc/cuda/ run on the CPU, and test_cuda_ops.py passes against them.

The .cu sources are rewritten into host C++ against tests/csrc/cuda_emu.h (a CTA's threads are real threads,
__syncthreads a barrier, warp shuffles a 32-thread exchange, dynamic shared memory NaN-filled; launch limits and
vector-load alignment checked), registered for the CPU in place of the CPU kernels, and built under
AddressSanitizer and UBSan when gcc ships their runtimes (``LOWRANK_EMU_SANITIZE=0`` turns them off). Then
test_cuda_ops.py runs in a subprocess with ``LOWRANK_TEST_CUDA_EMULATED=1`` against that build. This checks
indexing, tails, alignment choices, barriers, numerics and the host code on a machine without a GPU; it says
nothing about speed or nvcc's code generation (see test_cuda_compile.py for the real compile).

Needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h); no GPU and no CUDA build of torch. About 3 minutes
on 2 cores with the sanitizers (a build, then test_cuda_ops.py with every CTA on threads).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent


def cuda_include_dir() -> pathlib.Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(pathlib.Path(os.path.realpath(nvcc)).parents[1]))
    candidates.append("/usr/local/cuda")  # where nvcc on PATH is a wrapper script
    for home in filter(None, candidates):
        if (pathlib.Path(home) / "include" / "cuda_bf16.h").exists():
            return pathlib.Path(home) / "include"
    return None


CUDA_INCLUDE = cuda_include_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers not found (set CUDA_HOME or put nvcc on PATH)"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found"),
]


def sanitizer_preload() -> list[str]:
    """The ASan and UBSan runtimes to preload (ASan must come first in the process), or [] to build without."""
    if os.environ.get("LOWRANK_EMU_SANITIZE", "1") == "0":
        return []
    libraries = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return []
        libraries.append(path)
    return libraries


def rewrite_cuda_source(text: str, name: str) -> str:
    """A .cu/.cuh file as host C++ on cuda_emu.h, its CUDA registrations turned into CPU ones."""
    text, includes = re.subn(r"#include <c10/cuda/[^>]+>\n", "", text)
    text = text.replace('#include "nf4_cuda.cuh"', '#include "nf4_cuda_emu.h"')
    text = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = emu::dynamic_shared<\1>();", text)
    text = text.replace("__shared__ ", "static ")  # CTAs run one at a time: a static is the CTA's shared array
    text = text.replace("is_cuda()", "is_cpu()")
    text, registrations = re.subn(
        r"TORCH_LIBRARY_IMPL\(lowrank_ext, CUDA, m\)", "TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m)", text
    )
    text, launches = re.subn(r"([\w:]+(?:<[^<>]*>)?)<<<(.+?)>>>\(", r"emu::Launch(\2)(\1, ", text)
    assert "<<<" not in text and "__shared__" not in text, f"{name}: a launch or shared array was not rewritten"
    if name.endswith(".cu"):
        assert includes and registrations == 1 and launches, f"{name}: includes/registration/launches not found"
    return '#include "cuda_emu.h"\n' + text


# Runs in its own process: cpp_extension.load also loads the library, which must never meet the real lowrank._C.
BUILD = """
import sys
from torch.utils import cpp_extension
build_dir, include_dirs, sanitize, sources = sys.argv[1], sys.argv[2].split(":"), sys.argv[3] == "1", sys.argv[4:]
flags = ["-fsanitize=address,alignment,bounds,null,shift,signed-integer-overflow", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer"] if sanitize else []
cpp_extension.load(name="_C", sources=sources, extra_include_paths=include_dirs, build_directory=build_dir,
                   extra_cflags=["-O1", "-g", "-ffp-contract=off", "-fopenmp", "-pthread", *flags],
                   extra_ldflags=["-fopenmp", "-pthread", *flags], is_python_module=False)
"""


@pytest.fixture(scope="module")
def emulated_package(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
    """(a folder holding a `lowrank` package whose _C is the emulated build, the environment to run it in)."""
    work = tmp_path_factory.mktemp("cuda_emu")
    sources = work / "src"
    sources.mkdir()
    shutil.copy(HERE / "cuda_emu.h", sources / "cuda_emu.h")
    header = ROOT / "csrc" / "cuda" / "nf4_cuda.cuh"
    (sources / "nf4_cuda_emu.h").write_text(rewrite_cuda_source(header.read_text(), header.name))
    built = [ROOT / "csrc" / "module.cpp"]
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        built.append(sources / f"{cu.stem}_emu.cpp")
        built[-1].write_text(rewrite_cuda_source(cu.read_text(), cu.name))
    # nf4_cpu.cpp for its shared helpers and tables, without its CPU kernels (the emulated ones take their place)
    cpu_source = (ROOT / "csrc" / "nf4_cpu.cpp").read_text()
    cpu, removed = re.subn(r"TORCH_LIBRARY_IMPL\(lowrank_ext, CPU, m\) \{.*?\n\}\n", "", cpu_source, flags=re.S)
    assert removed == 1, "nf4_cpu.cpp: its kernel registration block was not found"
    built.append(sources / "nf4_cpu_helpers.cpp")
    built[-1].write_text(cpu)

    preload = sanitizer_preload()
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0"}
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    include_dirs = ":".join(map(str, (sources, ROOT / "csrc", CUDA_INCLUDE)))
    build = subprocess.run(
        [sys.executable, "-c", BUILD, str(work), include_dirs, "1" if preload else "0", *map(str, built)],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert build.returncode == 0, f"emulated build failed:\n{build.stdout[-3000:]}\n{build.stderr[-6000:]}"

    package = work / "pkg" / "lowrank"
    package.mkdir(parents=True)
    for entry in (ROOT / "src" / "lowrank").iterdir():
        if entry.name != "__pycache__" and not entry.name.startswith("_C"):
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(ROOT / "kernels")
    shutil.copy(work / "_C.so", package / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))
    env["LOWRANK_TEST_CUDA_EMULATED"] = "1"
    env.pop("LOWRANK_DISABLE_EXT", None)
    return package.parent, env


def test_the_emulated_build_is_the_one_lowrank_loads(emulated_package):
    folder, env = emulated_package
    check = (
        "import torch; from lowrank import _ext; module, error = _ext._import(); print(module.__file__); "
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('lowrank_ext::lora_forward', 'CPU'); "
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('lowrank_ext::quantize_4bit', 'CPU')"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(folder)), result.stdout


def test_cuda_ops_pass_on_the_emulated_kernels(emulated_package):
    folder, env = emulated_package
    # --capture=sys: a sanitizer's or the emulator's report (written to fd 2 before an abort) reaches this process
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--capture=sys",
               "-m", "not slow", str(HERE / "test_cuda_ops.py")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    output = result.stdout[-8000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    # only the tests about devices and streams skip: every kernel test ran
    assert re.search(r"\b2 skipped\b", result.stdout) and " failed" not in result.stdout, output
