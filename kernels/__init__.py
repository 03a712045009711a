"""Triton kernels and their pure-torch references (installed as ``lowrank.kernels``).

This folder sits at the top of the repository, so wherever the repository root is on ``sys.path``
(Python started there, pytest) it is also found as a top-level package named ``kernels`` and would hide
every other package of that name, e.g. Hugging Face's ``kernels``, which transformers and bitsandbytes
look for. Imported under that name, this package steps aside: it loads the next ``kernels`` on
``sys.path`` in its place or, when there is none, stays an empty namespace-like package (no
``__file__``, nothing under it), which importers treat as "not installed".

(A folder without ``__init__.py`` would be a namespace portion, which loses to a regular package on its
own; but setuptools' editable installs cannot map ``lowrank.kernels`` onto such a folder, pypa/setuptools
issue 4943.)
"""

import sys

if __name__ == "kernels":

    def _step_aside() -> None:
        import importlib.machinery
        import importlib.util
        import os

        global __file__, __path__
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None:
            __file__, __path__ = None, []
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _step_aside()
