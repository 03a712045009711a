"""Build the optional C++/CUDA extension (``lowrank._C``). Everything else is in pyproject.toml.

The extension is optional: without torch at build time, without a compiler, or when the build fails,
the package installs without it and lowrank uses its torch/triton backends. Switches:
LOWRANK_BUILD_EXT=0 skips it; LOWRANK_BUILD_CUDA=1 also compiles the CUDA kernels (needs nvcc and a
CUDA build of torch; there are no CUDA sources yet, so it only reports that).

Install with ``pip install --no-build-isolation -e .`` (build isolation would pull a CUDA torch).
"""

import glob
import os

from setuptools import setup

# -ffp-contract=off: the double-quantized constants are fp32(a * b) + c with two roundings; an FMA would
# change the last bit. No -march=native: the build must run on any x86-64 (AVX-512 is picked at run time).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]


def extension_modules():
    if os.environ.get("LOWRANK_BUILD_EXT", "1") == "0":
        print("lowrank: LOWRANK_BUILD_EXT=0; building without the C++ extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("lowrank: torch is not importable at build time; building without the C++ extension")
        return [], {}
    if os.environ.get("LOWRANK_BUILD_CUDA") == "1":
        print("lowrank: LOWRANK_BUILD_CUDA=1, but the extension has no CUDA kernels yet; building the CPU part only")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension, but a failure (no compiler, incompatible headers) only skips it."""

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

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                self.report(err)

        def copy_extensions_to_source(self):  # editable installs: nothing to copy after a failed build
            if not OptionalBuildExt.failed:
                super().copy_extensions_to_source()

    extension = cpp_extension.CppExtension(
        "lowrank._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": OptionalBuildExt.with_options(use_ninja=False)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
