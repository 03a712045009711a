"""Packaging: the top-level ``kernels/`` folder installs as ``lowrank.kernels`` and never hides another
package named ``kernels`` when the repository root is on sys.path (see kernels/__init__.py)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_another_kernels_package_wins_from_the_repository_root(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def get_kernel(name):\n    return 'fake ' + name\n")
    done = run_python(
        "from kernels import get_kernel; import kernels; print(get_kernel('x')); print(kernels.__file__)",
        cwd=REPO,
        pythonpath=str(tmp_path / "site"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["fake x", str(fake / "__init__.py")]


def test_without_another_kernels_package_the_name_looks_uninstalled_from_the_repository_root():
    done = run_python(
        "import importlib.machinery, os, sys\n"
        "others = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != os.getcwd()]\n"
        "if importlib.machinery.PathFinder.find_spec('kernels', others) is not None:\n"
        "    print('installed'); raise SystemExit\n"
        "import kernels\n"
        "print(kernels.__file__, kernels.__path__)\n"
        "for statement in ('from kernels import get_kernel', 'import kernels.nf4'):\n"
        "    try:\n        exec(statement)\n    except ImportError as e:\n        print(type(e).__name__)\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print(is_kernels_available())\n",
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "installed":
        pytest.skip("a package named kernels is installed here; the test above covers that case")
    assert done.stdout.splitlines() == ["None []", "ImportError", "ModuleNotFoundError", "False"]


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_lowrank_kernels_resolves_to_the_kernels_folder(tmp_path, where):
    code = (
        "import sys, lowrank.kernels.nf4, lowrank.kernels.lora_matmul\n"
        "print(lowrank.kernels.nf4.__file__); print('kernels' in sys.modules)"
    )
    done = run_python(code, cwd=REPO if where == "repository root" else tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    path, top_level_loaded = done.stdout.splitlines()
    assert Path(path).parent.name == "kernels" and Path(path).name == "nf4.py"
    assert top_level_loaded == "False"


@pytest.mark.slow
def test_the_wheel_installs_kernels_as_lowrank_kernels(tmp_path):
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ".",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=tree, env={**os.environ, "LOWRANK_BUILD_EXT": "0"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lowrank/kernels/__init__.py", "lowrank/kernels/nf4.py", "lowrank/kernels/lora_matmul.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    code = "import lowrank.kernels.nf4 as K; print(K.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == target / "lowrank" / "kernels" / "nf4.py"
