"""lowrank.train and ``lowrank finetune`` across torchrun processes (2 gloo ranks on CPU): DDP and FSDP2 give the
single-process losses, a killed run resumes from its sharded checkpoints on another number of ranks, and the
CLI writes the same files as a single-process run. Every launch is time-boxed and its process group killed."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch
from checkpoints import tiny_llama_dir
from safetensors.torch import load_file

from lowrank.distributed import DistributedError
from lowrank.train import list_checkpoints, train

WORKER = Path(dist_worker.__file__)
SHARED = WORKER.parent
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def launch(command: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run ``command`` in its own process group; kill the whole group on timeout or failure to finish."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SHARED), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        try:  # never leave a rank behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, output


def torchrun(nproc: int, *args: str, timeout: float = 240) -> tuple[int, str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return launch(command, timeout)


def worker(nproc: int, out: Path, mode: str, *extra: str) -> tuple[int, str]:
    return torchrun(nproc, str(WORKER), str(out), mode, *extra)


def results(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"result-rank{rank}.json").read_text())


def assert_same_run(got: dict, expected: dict) -> None:
    # the same arithmetic up to the order of the all-reduce sums (float32 rounding only)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad_norm"], expected["grad_norm"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["delta_w_total"], expected["delta_w_total"], rtol=1e-4, atol=1e-6)


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    for key in x:
        assert x[key].shape == y[key].shape, key
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-5, msg=key)


def single_process(out: Path) -> dict:
    torch.set_num_threads(1)
    result = train(dist_worker.model(), dist_worker.data(), None, dist_worker.config(str(out), "none"))
    return {key: [h[key] for h in result.history] for key in ("loss", "grad_norm", "delta_w_total")}


def test_ddp_and_fsdp2_equal_one_process_and_resume_on_one_rank(tmp_path):
    reference = single_process(tmp_path / "single")

    code, log = worker(2, tmp_path / "ddp", "ddp")
    assert code == 0, log[-4000:]
    assert_same_run(results(tmp_path / "ddp"), reference)
    assert results(tmp_path / "ddp", 1) == results(tmp_path / "ddp")  # every rank logged the same global losses

    # FSDP2, killed right after step 4 (its checkpoint complete), plus a checkpoint write killed half-way
    run = tmp_path / "fsdp2"
    code, log = worker(2, run, "fsdp2", "--crash-at", "4")
    assert code != 0 and not (run / "result-rank0.json").exists(), log[-4000:]
    checkpoints = run / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (checkpoints / "step-000004").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.json",
    ]
    assert not [p for p in checkpoints.iterdir() if ".pt" in p.name or p.suffix in (".bin", ".pkl")]
    (checkpoints / ".step-000006.tmp-deadbeef").mkdir()  # what a kill during dcp.save leaves

    # 2 ranks -> 1 process (no torchrun): the same losses as the uninterrupted run
    torch.set_num_threads(1)
    resumed = train(dist_worker.model(), dist_worker.data(), None, dist_worker.config(str(run), "none", resume=True))
    assert_same_run({key: [h[key] for h in resumed.history] for key in reference}, reference)
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000004", "step-000006"]


@pytest.mark.slow
def test_resume_one_rank_on_two_and_bad_input(tmp_path):
    reference = single_process(tmp_path / "single")
    run = tmp_path / "run"
    code, log = worker(1, run, "ddp", "--crash-at", "2")  # 1 rank ...
    assert code != 0 and [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"], log[-4000:]
    code, log = worker(2, run, "fsdp2", "--resume")  # ... resumed on 2 FSDP2 ranks
    assert code == 0, log[-4000:]
    assert_same_run(results(run), reference)
    assert_same_weights(
        run / "trainable.safetensors", tmp_path / "single" / "checkpoints" / "step-000006" / "trainable.safetensors"
    )

    code, log = worker(2, tmp_path / "odd", "ddp", "--batch-size", "3")
    assert code != 0 and "batch_size=3 is the global micro-batch and must split evenly over the world size 2" in log


def test_distributed_without_torchrun_is_refused(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for mode in ("ddp", "fsdp2"):
        with pytest.raises(DistributedError, match=f"torchrun --nproc_per_node N .*--distributed {mode}"):
            train(dist_worker.model(), dist_worker.data(), None, dist_worker.config(str(tmp_path), mode))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_finetune_under_torchrun_writes_the_single_process_files(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "model")
    flags = ["--task", "generation", "--model", str(model_dir), "--method", "qlora", "--max-steps", "3"]
    flags += ["--batch-size", "4", "--max-new-tokens", "4", "--no-progress", "--save-every", "2"]
    code, log = launch([sys.executable, "-m", "lowrank", "finetune", *flags, "--output", str(tmp_path / "one")])
    assert code == 0, log[-4000:]
    code, log = torchrun(
        2, "-m", "lowrank", "finetune", *flags, "--output", str(tmp_path / "two"), "--distributed", "fsdp2"
    )
    assert code == 0, log[-4000:]
    one, two = tmp_path / "one", tmp_path / "two"

    def listing(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "checkpoints" not in p.parts)

    assert listing(one) == listing(two)
    runs = [json.loads((d / "run.json").read_text()) for d in (one, two)]
    assert [{k: v for k, v in r.items() if k != "output"} for r in runs] == [
        {k: v for k, v in runs[0].items() if k != "output"}
    ] * 2  # the same run record: --distributed is how it ran, not what it is
    assert (one / "adapter" / "adapter_config.json").read_text() == (
        two / "adapter" / "adapter_config.json"
    ).read_text()
    assert_same_weights(one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["steps"] == b["steps"] == 3
    torch.testing.assert_close(a["after"]["loss"], b["after"]["loss"], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000003"]

    code, log = launch(
        [sys.executable, "-m", "lowrank", "finetune", *flags, "--output", str(tmp_path / "x"), "--distributed", "ddp"]
    )
    assert code == 2 and "needs the processes torchrun starts" in log and not (tmp_path / "x").exists()
    odd = list(flags)
    odd[odd.index("--batch-size") + 1] = "3"
    code, log = torchrun(2, "-m", "lowrank", "finetune", *odd, "--output", str(tmp_path / "y"), "--distributed", "ddp")
    assert code != 0 and "must split evenly over the world size 2" in log and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_readme_big_model_recipe_runs_as_written(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- recipe:big-model -->", 1)[1].split("<!-- /recipe:big-model -->", 1)[0]
    script = block.strip().removeprefix("```bash").removesuffix("```")
    model_dir = tiny_llama_dir(tmp_path / "model")
    bin_dir = str(Path(sys.executable).parent)
    command = [
        "bash",
        "-euo",
        "pipefail",
        "-c",
        f"export PATH={bin_dir}:$PATH MODEL={model_dir} OUT={tmp_path / 'out'}\n{script}",
    ]
    code, log = launch(command, timeout=500)
    assert code == 0, log[-4000:]
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
