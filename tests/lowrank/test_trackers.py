"""Experiment trackers: each writes the run to a local store, read back with the tracker's own reader."""

import glob
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
import transformers
from helpers import tiny

from lowrank import trackers
from lowrank.config import ConfigError, TrainConfig
from lowrank.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_bert(seed=0):
    return tiny("bert", seed)


def cls_data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(10, 40, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": [1, 5 + i % 3, *tokens], "labels": i % 3})
    return out


def config(tmp_path: Path, report_to) -> TrainConfig:
    return TrainConfig(
        max_steps=3, batch_size=4, lr=1e-3, eval_every=2, output_dir=str(tmp_path), progress=False, report_to=report_to
    )


def final_files(tmp_path: Path) -> list[Path]:
    """A PNG plot and a markdown report, as the CLI leaves them at the end of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3])
    fig.savefig(tmp_path / "loss.png", dpi=30)
    plt.close(fig)
    (tmp_path / "report.md").write_text("# report\nfinal loss\n", encoding="utf-8")
    return [tmp_path / "loss.png", tmp_path / "report.md"]


def run_with(tmp_path: Path, name: str):
    """Train 3 steps (evaluations at steps 2 and 3) reporting to ``name``; attach the final files; close."""
    cfg = config(tmp_path, [name]).validate()
    reporter = trackers.open_trackers(cfg.report_to, {"model": "tiny-bert", **vars(cfg)}, cfg.output_dir)
    assert [t.name for t in reporter.trackers] == [name]
    result = train(tiny_bert(), cls_data(), cls_data(6, seed=3), cfg, reporter=reporter)
    reporter.log_files(final_files(tmp_path))
    reporter.close()
    assert [e["step"] for e in result.evals] == [2, 3]
    return result, reporter.trackers[0]


def expect_train(result, key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in result.history]


def expect_eval(result, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in result.evals]


# --------------------------------------------------------------------------------------- names and errors


def test_parse_report_to():
    assert trackers.parse_report_to(None) == []
    assert trackers.parse_report_to("none") == []
    assert trackers.parse_report_to("tensorboard, WandB,tensorboard") == ["tensorboard", "wandb"]
    assert trackers.parse_report_to(["mlflow", "trackio"]) == ["mlflow", "trackio"]
    with pytest.raises(trackers.TrackerError, match=r"unknown tracker\(s\) \['tensorbord'\].*known"):
        trackers.parse_report_to("tensorbord")
    with pytest.raises(trackers.TrackerError, match="'none' cannot be combined"):
        trackers.parse_report_to("none,wandb")
    with pytest.raises(ConfigError, match="unknown tracker"):
        TrainConfig(report_to=["comet"]).validate()
    assert TrainConfig(report_to="tensorboard").validate().report_to == ["tensorboard"]


@pytest.mark.parametrize("name", sorted(trackers.TRACKERS))
def test_missing_tracker_is_a_clear_error_before_training(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, trackers.TRACKERS[name][0], None)  # import of it now fails
    with pytest.raises(ConfigError, match=rf"\['{name}'\].*not installed.*pip install 'lowrank-qlora\[{name}\]'"):
        TrainConfig(report_to=[name]).validate()

    def never(entry):
        raise AssertionError("a training step ran although the tracker is missing")

    cfg = TrainConfig(max_steps=1, batch_size=4, progress=False, report_to=[name])
    with pytest.raises(ConfigError, match=rf"pip install 'lowrank-qlora\[{name}\]'"):
        train(tiny_bert(), cls_data(), None, cfg, on_step=never)
    with pytest.raises(trackers.TrackerError, match="not installed"):
        trackers.open_trackers([name], {}, str(tmp_path))


def test_a_tracker_that_cannot_start_is_named_and_the_others_are_closed(tmp_path, monkeypatch):
    closed = []

    class Refuses(trackers.Tracker):
        name = "mlflow"

        def __init__(self, output_dir, run_name, config):
            raise RuntimeError("no server at http://example.invalid")

        def log_metrics(self, metrics, step): ...
        def log_files(self, paths, step): ...
        def close(self, failed=False): ...

    original_close = trackers.TensorBoardTracker.close
    monkeypatch.setattr(
        trackers.TensorBoardTracker, "close", lambda self, failed=False: (closed.append(failed), original_close(self))
    )
    monkeypatch.setitem(trackers._ADAPTERS, "mlflow", Refuses)
    monkeypatch.setattr(trackers, "check_available", lambda names: None)
    with pytest.raises(trackers.TrackerError, match="mlflow could not start a run: no server at"):
        trackers.open_trackers(["tensorboard", "mlflow"], {"lr": 1.0}, str(tmp_path))
    assert closed == [True]


def test_checking_trackers_imports_none_of_them():
    import subprocess

    if not all(trackers.is_installed(name) for name in trackers.TRACKERS):
        pytest.skip("needs all four trackers installed (the test extra)")

    code = (
        "import sys\n"
        "from lowrank.config import TrainConfig\n"
        "from lowrank import trackers, train\n"
        "TrainConfig(report_to='tensorboard,wandb,mlflow,trackio').validate()\n"
        "trackers.open_trackers('none', {}, None).close()\n"
        "print(sorted(m for m in ('tensorboard', 'wandb', 'mlflow', 'trackio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_logs_are_unchanged_by_reporting(tmp_path):
    plain = train(tiny_bert(), cls_data(), cls_data(6, seed=3), config(tmp_path / "a", "none"))
    reported = train(tiny_bert(), cls_data(), cls_data(6, seed=3), config(tmp_path / "b", ["tensorboard"]))
    keys = ("step", "loss", "lr", "grad_norm", "targets", "tokens")
    assert [{k: h[k] for k in keys} for h in plain.history] == [{k: h[k] for k in keys} for h in reported.history]
    assert [set(h) for h in plain.history] == [set(h) for h in reported.history]
    assert plain.evals == reported.evals
    assert not (tmp_path / "a" / "tensorboard").exists() and (tmp_path / "b" / "tensorboard").is_dir()


def test_only_rank_zero_reports(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    reporter = trackers.open_trackers(["tensorboard"], {"lr": 1.0}, str(tmp_path))
    assert not reporter and reporter.trackers == []
    reporter.log_step({"step": 1, "loss": 1.0})
    reporter.close()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    reporter = trackers.open_trackers(["tensorboard"], {"lr": 1.0}, str(tmp_path))
    assert [t.name for t in reporter.trackers] == ["tensorboard"]
    reporter.close()


# --------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result, tracker = run_with(tmp_path, "tensorboard")
    assert Path(tracker.logdir) == tmp_path / "tensorboard"
    events = EventAccumulator(tracker.logdir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(s, pytest.approx(v, rel=1e-6, abs=1e-12)) for s, v in expect_train(result, key)]
    for key in ("loss", "accuracy", "f1"):
        got = [(e.step, e.value) for e in events.Scalars(f"eval/{key}")]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in expect_eval(result, key)]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(1e-3) and hparams["model"].string_value == "tiny-bert"
    image = events.Images("plots/loss")[-1]
    assert image.step == 3 and image.width > 0 and image.height > 0
    assert "files/report.md/text_summary" in events.Tags()["tensors"]


# --------------------------------------------------------------------------------------- Weights & Biases


def read_wandb_records(path: Path):
    """The records of an offline ``run-*.wandb`` file: W&B's block log (7-byte ``:W&B`` header, 32 KiB
    blocks of CRC-checked chunks) decoded with W&B's own ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # too little room left in this block for a chunk header
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        data = raw[pos + 7 : pos + 7 + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc
        pos += 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    import wandb

    try:
        result, tracker = run_with(tmp_path, "wandb")
    finally:
        wandb.teardown()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(Path(path))
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = history.setdefault(r.history.step.num, {})
            for item in r.history.item:  # a key is `key`, or a path `nested_key` (one element for "a/b" names)
                path = [item.key] if item.key else list(item.nested_key)
                row[path[0] if len(path) == 1 else tuple(path)] = json.loads(item.value_json)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert [(s, history[s][f"train/{key}"]) for s, _ in expect_train(result, key)] == expect_train(result, key)
    for key in ("loss", "accuracy", "f1"):
        assert [(s, history[s][f"eval/{key}"]) for s, _ in expect_eval(result, key)] == expect_eval(result, key)
    assert history[3][("plots/loss", "_type")] == "image-file"  # a nested value: key path ["plots/loss", "_type"]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 1e-3 and config["model"] == "tiny-bert" and run.project == "lowrank"
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "report" and sorted(m.path for m in artifact.manifest.contents) == ["loss.png", "report.md"]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


# --------------------------------------------------------------------------------------- MLflow


def test_mlflow_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    from mlflow.tracking import MlflowClient

    result, tracker = run_with(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params["lr"] == "0.001" and run.data.params["model"] == "tiny-bert"
    assert run.data.params["report_to"] == '["mlflow"]'
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, f"train/{key}"))
        assert got == expect_train(result, key)
    for key in ("loss", "accuracy", "f1"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, f"eval/{key}"))
        assert got == expect_eval(result, key)
    files = sorted(a.path for a in client.list_artifacts(tracker.run_id, "report"))
    assert files == ["report/loss.png", "report/report.md"]
    assert (tmp_path / "mlartifacts").is_dir()


# --------------------------------------------------------------------------------------- trackio


def test_trackio_local_store(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when it is imported: import it afresh with the temporary store.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    monkeypatch.delenv("TRACKIO_SERVER_URL", raising=False)
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)
    result, tracker = run_with(tmp_path, "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / "lowrank.db").is_file()
    assert SQLiteStorage.get_runs("lowrank") == [tmp_path.name]
    logs = SQLiteStorage.get_logs("lowrank", tmp_path.name)
    by_step: dict[int, dict] = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert [(s, by_step[s][f"train/{key}"]) for s, _ in expect_train(result, key)] == expect_train(result, key)
    for key in ("loss", "accuracy", "f1"):
        assert [(s, by_step[s][f"eval/{key}"]) for s, _ in expect_eval(result, key)] == expect_eval(result, key)
    config = SQLiteStorage.get_run_config("lowrank", tmp_path.name)
    assert config["lr"] == 1e-3 and config["model"] == "tiny-bert"
    artifacts = SQLiteStorage.get_run_artifacts("lowrank", tmp_path.name, tracker.run.id)["output"]
    assert [(a["name"], a["type"]) for a in artifacts] == [(f"report-{tmp_path.name}", "report")]
    manifest = SQLiteStorage.get_artifact_manifest("lowrank", f"report-{tmp_path.name}", None)
    assert sorted(f["path"] for f in manifest["manifest"]) == ["loss.png", "report.md"]


# --------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT with a word-level tokenizer over the shipped topic data, saved as a local model dir."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from lowrank import data as D

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = set()
    for name in ("topics_train.jsonl", "topics_eval.jsonl"):
        for _, record in D.read_records(D.shipped(name)):
            words |= {w for value in record.values() for w, _ in split(str(value).lower())}
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["[PAD]", "[UNK]", *sorted(words)])}, "[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    root = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def cli_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--output", str(out), "--max-steps", "2", "--no-progress", *extra]


def test_cli_report_to_tensorboard(bert_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowrank.cli import main

    out = tmp_path / "run"
    assert main(cli_args(bert_dir, out, "--report-to", "tensorboard", "--eval-every", "1")) == 0
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in logged]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [1, 2]
    assert [e.step for e in events.Scalars("before/accuracy")] == [0]
    assert [e.step for e in events.Scalars("after/accuracy")] == [2]
    assert {"plots/loss", "plots/delta_w", "plots/step_time"} <= set(events.Tags()["images"])
    assert "files/report.md/text_summary" in events.Tags()["tensors"]


def test_cli_report_to_errors(bert_dir, tmp_path, capsys, monkeypatch):
    from lowrank.cli import main

    out = tmp_path / "run"
    assert main(cli_args(bert_dir, out, "--report-to", "tensorbord")) == 2
    err = capsys.readouterr().err
    assert "--report-to" in err and "unknown tracker(s) ['tensorbord']" in err and "trackio" in err, err
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(cli_args(bert_dir, out, "--report-to", "tensorboard,wandb")) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error:") and "pip install 'lowrank-qlora[wandb]'" in err, err
    assert not out.exists()
