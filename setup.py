"""Build the optional C++/CUDA extension (``lowrank._C``). Everything else is in pyproject.toml.

The extension is optional: without torch at build time, without a compiler, or when the build fails,
the package installs without it and lowrank uses its torch/triton backends. Switches:
LOWRANK_BUILD_EXT=0 skips it; LOWRANK_BUILD_CUDA=1 also compiles the CUDA kernels in csrc/cuda/ when torch
is a CUDA build and nvcc is found (otherwise it says why and builds the CPU part only). TORCH_CUDA_ARCH_LIST
(e.g. "8.0;9.0") picks the GPU architectures; without it they are sm_80 and sm_90 plus compute_90 PTX.
If the CUDA build fails, the CPU-only extension is built instead.

Install with ``pip install --no-build-isolation -e .`` (build isolation would pull a CUDA torch).
"""

import copy
import glob
import os

from setuptools import setup

# -ffp-contract=off: the double-quantized constants are fp32(a * b) + c with two roundings; an FMA would
# change the last bit. No -march=native: the build must run on any x86-64 (AVX-512 is picked at run time).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
# The CUDA kernels write the two-rounding constant arithmetic with __fmul_rn / __fadd_rn, which nvcc never
# fuses, so FMA contraction stays on for the matmul accumulations. No -std: torch appends the standard its
# headers need.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_CUDA_ARCHES = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def cpu_sources() -> list[str]:
    return sorted(glob.glob("csrc/*.cpp"))


def cuda_sources() -> list[str]:
    return sorted(glob.glob("csrc/cuda/*.cu"))


def nvcc_flags() -> list[str]:
    """nvcc flags; the architectures come from TORCH_CUDA_ARCH_LIST (read by torch) when it is set."""
    return NVCC_FLAGS + ([] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCHES)


def cuda_build_blocker(cpp_extension) -> str | None:
    """Why the CUDA kernels cannot be built here, or None when they can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not cuda_sources():
        return "csrc/cuda/ has no .cu sources"
    return None


def extension_modules():
    if os.environ.get("LOWRANK_BUILD_EXT", "1") == "0":
        print("lowrank: LOWRANK_BUILD_EXT=0; building without the C++ extension")
        return [], {}
    sources = cpu_sources()
    if not sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("lowrank: torch is not importable at build time; building without the C++ extension")
        return [], {}

    print(
        f"lowrank: building the C++ extension lowrank._C from {len(sources)} sources in csrc/ "
        "(about a minute on 2 cores; LOWRANK_BUILD_EXT=0 skips it)",
        flush=True,
    )
    cpu_extension = cpp_extension.CppExtension(
        "lowrank._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    extension = cpu_extension
    if os.environ.get("LOWRANK_BUILD_CUDA") == "1":
        blocker = cuda_build_blocker(cpp_extension)
        if blocker is None:
            print(f"lowrank: LOWRANK_BUILD_CUDA=1; building the CUDA kernels too ({', '.join(cuda_sources())})")
            try:
                extension = cpp_extension.CUDAExtension(
                    "lowrank._C",
                    sources + cuda_sources(),
                    include_dirs=[os.path.abspath("csrc")],
                    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags()},
                    extra_link_args=["-fopenmp"],
                )
            except Exception as err:  # noqa: BLE001 - e.g. CUDA library paths not found; keep the CPU build
                print(
                    f"lowrank: cannot set up the CUDA build ({type(err).__name__}: {err}); building the CPU part only"
                )
        else:
            print(f"lowrank: LOWRANK_BUILD_CUDA=1, but {blocker}; building the CPU part only")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension, but a failure (no compiler, incompatible headers) only skips it; a failed
        CUDA build falls back to the CPU-only extension first."""

        failed = False

        def report(self, err):
            if not OptionalBuildExt.failed:
                print(
                    f"lowrank: the C++ extension failed to build ({type(err).__name__}: {err}); continuing without it"
                )
            OptionalBuildExt.failed = True

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure must leave a working install
                self.report(err)

        def build_extensions(self):
            cuda_extensions = [ext for ext in self.extensions if ext.sources != cpu_extension.sources]
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001 - retry without the CUDA kernels, else give up
                if not cuda_extensions:
                    raise
                print(f"lowrank: the CUDA build failed ({type(err).__name__}: {err}); building the CPU part only")
                for ext in cuda_extensions:  # the object setuptools finalised, turned into the CPU extension
                    for attr in (
                        "sources",
                        "include_dirs",
                        "library_dirs",
                        "libraries",
                        "runtime_library_dirs",
                        "define_macros",
                        "extra_compile_args",
                        "extra_link_args",
                        "language",
                    ):
                        setattr(ext, attr, copy.deepcopy(getattr(cpu_extension, attr)))
                super().build_extensions()

        def build_extension(self, ext):
            if ext.sources != cpu_extension.sources:  # a failure reaches build_extensions, which retries
                super().build_extension(ext)
                return
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                self.report(err)

        def copy_extensions_to_source(self):  # editable installs: nothing to copy after a failed build
            if not OptionalBuildExt.failed:
                super().copy_extensions_to_source()

    return [extension], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


# Guarded so that tests and bench/gpu/build_ext_cuda.py can import the flags (setuptools runs this file as
# __main__).
if __name__ == "__main__":
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
