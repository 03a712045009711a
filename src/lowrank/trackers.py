"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio (``TrainConfig.report_to``).

The training loop's own ``log.jsonl`` / ``log.csv`` stay the record of a run; a tracker gets a copy of
the same numbers for its dashboard. One small adapter class per tracker implements :class:`Tracker`
(started with the run's configuration; ``log_metrics``, ``log_files``, ``close``); :class:`Reporter`
fans a run out to the chosen ones. Each tracker is an optional extra
(``pip install 'lowrank-qlora[wandb]'``) and is imported only when it is asked for;
:func:`check_available` names the missing extra before training starts.

What is reported: every numeric scalar of a step's log entry under ``train/`` (loss, lr, grad_norm,
tokens_per_s, peak_mem_mb, time_s, tokens, targets, delta_w_total), every numeric evaluation metric
under ``eval/`` at its step, the run configuration as hyper-parameters, and (from the CLI) the final
plots and ``report.md`` as artifacts where the tracker has them. In a distributed run only rank 0
reports (the other ranks get a Reporter without trackers).

Where each tracker writes (its own conventions first, then the run's ``output_dir``):

- ``tensorboard``: ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/tensorboard``, else ``runs/<time>``.
- ``wandb``: W&B's own settings (``WANDB_MODE=offline`` works without network, ``WANDB_PROJECT``,
  ``WANDB_DIR``); without ``WANDB_DIR`` the run's files go under ``<output_dir>/wandb``. Project default
  ``lowrank``.
- ``mlflow``: ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<output_dir>/mlflow.db`` with artifacts in
  ``<output_dir>/mlartifacts`` (MLflow's plain file store is deprecated), else MLflow's default.
  Experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``lowrank``.
- ``trackio``: trackio's local store (``$TRACKIO_DIR``, read by trackio when it is imported), project
  ``$TRACKIO_PROJECT`` or ``lowrank``.
"""

from __future__ import annotations

import abc
import atexit
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# name -> (module that must be importable, pip extra)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "lowrank"


class TrackerError(ValueError):
    """An unknown tracker name, or a tracker whose package is not installed."""


# --------------------------------------------------------------------------------------- names


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """Tracker names from ``"tensorboard,wandb"``, a list of names, ``"none"`` or None; order kept, no repeats."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split(",")]
    else:
        raise TrackerError(f"report_to must be a comma-separated string or a list of tracker names, got {value!r}")
    names = [item.strip().lower() for item in items if item.strip()]
    if "none" in names:
        if len(names) > 1:
            raise TrackerError(f"report_to={value!r}: 'none' cannot be combined with tracker names")
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"report_to={value!r}: unknown tracker(s) {unknown}; known: {sorted(TRACKERS)} or 'none'")
    return list(dict.fromkeys(names))


def install_hint(name: str) -> str:
    return f"pip install 'lowrank-qlora[{TRACKERS[name][1]}]'"


def is_installed(name: str) -> bool:
    """Whether the tracker's package can be imported (checked without importing it)."""
    module = TRACKERS[name][0]
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`TrackerError` naming the ``pip install`` command of every requested tracker not installed."""
    missing = [n for n in names if not is_installed(n)]
    if missing:
        hints = "; ".join(f"{n}: {install_hint(n)}" for n in missing)
        raise TrackerError(
            f"report_to asks for {missing}, which {'is' if len(missing) == 1 else 'are'} not installed ({hints})"
        )


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerError(f"report_to={name!r} needs {TRACKERS[name][0]}: {install_hint(name)} ({err})") from err


# --------------------------------------------------------------------------------------- values


def _scalars(values: Mapping, prefix: str) -> dict[str, float]:
    """Finite numeric scalars of ``values`` as floats under ``prefix/`` (dicts, lists and text are skipped)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "step" or key.startswith("_"):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _hparams(config: Mapping) -> dict[str, str | int | float | bool]:
    """The run configuration as flat scalars (None and containers become their JSON text)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, default=str)
    return out


def _run_name(output_dir: str | None) -> str | None:
    return Path(output_dir).name if output_dir else None


# --------------------------------------------------------------------------------------- adapters


class Tracker(abc.ABC):
    """One tracker's run, started by the constructor ``(output_dir, run_name, config)`` with the run's
    configuration as hyper-parameters; ``name`` is the ``report_to`` name."""

    name = ""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def log_files(self, paths: list[Path], step: int) -> None:
        """Attach finished files (PNG plots, a markdown report) to the run."""

    @abc.abstractmethod
    def close(self, failed: bool = False) -> None: ...


class TensorBoardTracker(Tracker):
    """Event files: scalars, the hparams plugin's session, PNGs as images, text files as text."""

    name = "tensorboard"

    def __init__(self, output_dir: str | None, run_name: str | None, config: dict):
        _import(self.name, "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        logdir = os.environ.get("TENSORBOARD_LOGGING_DIR") or (
            str(Path(output_dir) / "tensorboard") if output_dir else None
        )
        self.writer = SummaryWriter(log_dir=logdir)
        self.logdir = self.writer.get_logdir()
        from torch.utils.tensorboard.summary import hparams

        # The three hparams summaries go into this run's own event file (SummaryWriter.add_hparams would
        # open a second run in a subdirectory).
        writer = self.writer._get_file_writer()
        for summary in hparams(config, {}):
            writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_files(self, paths, step):
        from matplotlib import image

        for path in paths:
            if path.suffix.lower() == ".png":
                pixels = image.imread(str(path))  # H x W x (3|4) floats in [0, 1]
                self.writer.add_image(f"plots/{path.stem}", pixels[..., :3], step, dataformats="HWC")
            else:
                self.writer.add_text(f"files/{path.name}", path.read_text(encoding="utf-8"), step)

    def close(self, failed=False):
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run: history per step, config, PNGs as images, and every file in one ``report`` artifact."""

    name = "wandb"

    def __init__(self, output_dir: str | None, run_name: str | None, config: dict):
        self.wandb = _import(self.name, "wandb")
        kwargs = {"project": os.environ.get("WANDB_PROJECT", PROJECT), "name": run_name, "config": config}
        if output_dir and not os.environ.get("WANDB_DIR"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(output_dir)
        self.run = self.wandb.init(**kwargs)

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_files(self, paths, step):
        images = {f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths if p.suffix.lower() == ".png"}
        if images:
            self.run.log(images, step=step)
        artifact = self.wandb.Artifact(f"report-{self.run.id}", type="report")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


class MLflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run): params, metric history, artifacts."""

    name = "mlflow"

    def __init__(self, output_dir: str | None, run_name: str | None, config: dict):
        _import(self.name, "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifact_location = None
        if not uri and output_dir:
            root = Path(output_dir).resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{root / 'mlflow.db'}"
            artifact_location = (root / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self.client.create_experiment(name, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        params = [Param(self._key(k), str(v)[:6000]) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    @staticmethod
    def _key(key: str) -> str:
        return re.sub(r"[^\w\-. :/]", "_", key)  # the characters MLflow accepts in names

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self._key(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_files(self, paths, step):
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker(Tracker):
    """A trackio run in its local store: metrics per step, config, files as one ``report`` artifact."""

    name = "trackio"

    def __init__(self, output_dir: str | None, run_name: str | None, config: dict):
        self.trackio = _import(self.name, "trackio")
        self.project = os.environ.get("TRACKIO_PROJECT", PROJECT)
        self.run = self.trackio.init(project=self.project, name=run_name, config=config, embed=False)

    def log_metrics(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def log_files(self, paths, step):
        artifact = self.trackio.Artifact(name=f"report-{self.run.name}", type="report")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed=False):
        self.run.finish()


_ADAPTERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MLflowTracker,
    "trackio": TrackioTracker,
}

# --------------------------------------------------------------------------------------- the reporter


def _is_nonzero_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


class Reporter:
    """The trackers of one run. Without trackers every call is a no-op (and nothing is imported)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self.last_step = 0
        self.closed = False
        if self.trackers:
            atexit.register(self._close_at_exit)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, metrics: Mapping, step: int, prefix: str) -> None:
        values = _scalars(metrics, prefix)
        if not values or not self.trackers:
            return
        self.last_step = max(self.last_step, step)
        for tracker in self.trackers:
            tracker.log_metrics(values, step)

    def log_step(self, entry: Mapping) -> None:
        """One optimizer step's log entry (the dict the loop appends to its history)."""
        self.log_metrics(entry, entry["step"], "train")

    def log_eval(self, step: int, metrics: Mapping) -> None:
        self.log_metrics(metrics, step, "eval")

    def log_files(self, paths: Iterable[str | os.PathLike]) -> None:
        """Attach the files that exist among ``paths`` (plots, report) at the last logged step."""
        existing = [Path(p) for p in paths if Path(p).is_file()]
        if existing:
            for tracker in self.trackers:
                tracker.log_files(existing, self.last_step)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.trackers:
            atexit.unregister(self._close_at_exit)
        for tracker in self.trackers:
            tracker.close(failed)

    def _close_at_exit(self) -> None:  # the run was never closed: training raised
        self.close(failed=True)


def open_trackers(
    names: str | Sequence[str] | None, config: Mapping | None = None, output_dir: str | None = None
) -> Reporter:
    """Start a run in each tracker of ``names`` (see :func:`parse_report_to`) and log ``config`` to it.

    Raises :class:`TrackerError` for an unknown name or a tracker that is not installed, before any
    tracker is started. On a distributed rank other than 0 returns a Reporter without trackers.
    """
    chosen = parse_report_to(names)
    if not chosen or _is_nonzero_rank():
        return Reporter()
    check_available(chosen)
    flat = _hparams(config or {})
    run_name = _run_name(output_dir)
    started: list[Tracker] = []
    try:
        for name in chosen:
            try:
                started.append(_ADAPTERS[name](output_dir, run_name, flat))
            except TrackerError:
                raise
            except Exception as err:  # e.g. W&B online without a login: say which tracker, and how to run offline
                hint = " (WANDB_MODE=offline logs without network)" if name == "wandb" else ""
                raise TrackerError(f"report_to: {name} could not start a run: {err}{hint}") from err
    except BaseException:
        for tracker in started:
            tracker.close(failed=True)
        raise
    return Reporter(started)


__all__ = [
    "TRACKERS",
    "MLflowTracker",
    "Reporter",
    "TensorBoardTracker",
    "Tracker",
    "TrackerError",
    "TrackioTracker",
    "WandbTracker",
    "check_available",
    "install_hint",
    "is_installed",
    "open_trackers",
    "parse_report_to",
]
