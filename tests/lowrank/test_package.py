"""The package face (``lowrank/__init__.py``): lazy re-exports, light imports of the low layers."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lowrank

HEAVY = ("transformers", "matplotlib", "rouge_score", "lowrank.train", "lowrank.models")


def loaded_after(statement: str) -> list[str]:
    """The heavy modules in sys.modules after ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", ["import lowrank", "import lowrank.nf4", "import lowrank.kernels.nf4"])
def test_low_layers_load_without_the_library_above_them(statement):
    assert loaded_after(statement) == []


def test_every_public_name_resolves_to_its_definition():
    import lowrank.adapters
    import lowrank.models
    import lowrank.nf4
    import lowrank.train

    assert set(lowrank.__all__) == {"__version__", *lowrank._SUBMODULES, *lowrank._EXPORTS}
    for name in lowrank.__all__:
        value = getattr(lowrank, name)
        if name in lowrank._SUBMODULES:
            assert value is sys.modules[f"lowrank.{name}"]
        elif name != "__version__":
            assert value is getattr(sys.modules[lowrank._EXPORTS[name]], name), name
    assert lowrank.prepare_model is lowrank.models.prepare_model
    assert lowrank.quantize is lowrank.nf4.quantize
    assert set(lowrank.__all__) <= set(dir(lowrank))


def test_train_is_the_function_even_after_its_module_is_imported():
    code = textwrap.dedent(
        """
        import lowrank.train
        from lowrank.train import train
        import lowrank
        assert lowrank.train is train, lowrank.train
        from lowrank import freeze, train as t2
        assert t2 is train and freeze.__name__ == "lowrank.freeze"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lowrank.no_such_name  # noqa: B018


def test_the_face_has_no_import_time_imports_of_the_library():
    tree = ast.parse((Path(lowrank.__file__)).read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert not any(n and n.startswith("lowrank") for n in names), ast.unparse(node)
