"""Triton kernels and their pure-torch references (installed as ``lowrank.kernels``).

This folder sits at the top of the repository, so Python started in the repository root (``''`` first on
``sys.path``) would find it as a top-level package named ``kernels`` and hide every other package of that
name, e.g. Hugging Face's ``kernels``, which bitsandbytes imports. Imported under that name, this package
steps aside: it loads the next ``kernels`` on ``sys.path`` in its place, or fails as if it were absent.
(A folder without ``__init__.py`` would lose to a regular package on its own, but setuptools' editable
finder cannot map ``lowrank.kernels`` onto such a folder.)
"""

import sys

if __name__ == "kernels":

    def _load_the_other_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _load_the_other_kernels()
