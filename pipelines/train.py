"""Train a CTR model on a prepared dataset's Feast features, and evaluate it offline.

    nlpctr train --mode {baseline,cascade-frozen,cascade-finetuned,joint} --data DIR --run NAME [...]
    nlpctr evaluate --run NAME [--baseline RUN] [--runs-dir runs]

Turns the flags into a `TrainRequest` (what `nlpctr experiment` builds directly), reads the frames
from Feast, runs one function per mode (`pipelines/train_modes.py`) and writes `RUNS/NAME/`
(config.json, run.json, checkpoints/, predictions.parquet, results.json). All flags:
docs/USAGE.md, "Training and evaluation"; the modes, streaming and placement: docs/DESIGN.md,
"Modules in detail", train.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nlpctr
from nlpctr import prepared
from nlpctr.atomic import JsonObject, write_json
from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.features.names import lm_feature_slug
from nlpctr.layout import (
    CTR_HISTORY,
    CTR_META,
    LM_FEATURES,
    TRAINING,
    DatasetIdentity,
    Manifest,
    RunLayout,
    check_splits,
    lm_cache_dir,
    require_writable,
)
from nlpctr.models.config import MODES, Mode, TrainConfig, load_config
from nlpctr.models.ctr_net import FUSIONS, Fusion
from nlpctr.models.device import DEVICE_CHOICES, PRECISIONS
from nlpctr.models.encoder_source import canonical_name
from nlpctr.models.recipe import stage_summary
from nlpctr.models.runs import TrainedRun
from nlpctr.models.state_store import persisted_states
from nlpctr.models.trainer import FitResult
from nlpctr.models.training import LmStep, epochs_trained
from nlpctr.pipelines.flags import request_from_args
from nlpctr.pipelines.ownership import claim_output_dir
from nlpctr.pipelines.train_modes import TRAIN_MODE, RunSetup, lm_budget

STREAMING_ROWS = 500_000  # impressions above which `train` streams (a frame of ~1 GB in memory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr train", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--fusion", choices=FUSIONS, default=None, help="joint mode: how the LM joins")
    parser.add_argument(
        "--encoder",
        default=None,
        help="the encoder (an installed package or a model folder): the LM of E2/E3, the vectors of E1 "
        "(default: the config's encoder.name, MiniLM-L6)",
    )
    parser.add_argument("--layers", type=int, default=None, help="LM depth (E2, E3): its first K layers")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (E2: of the LM step)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    parser.add_argument("--run", required=True, help="run name: RUNS/NAME/")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--config", type=Path, default=None, help="YAML merged over the defaults")
    parser.add_argument(
        "--init-from", default=None, help="joint mode: start the CTR tower from this E0 run (in RUNS)"
    )
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--streaming",
        action="store_true",
        default=None,
        help=f"stream the training frame from parquet shards (default above {STREAMING_ROWS:,} impressions)",
    )
    memory.add_argument("--in-memory", dest="streaming", action="store_false", help="load it in memory")
    parser.add_argument(
        "--probe-only",
        action="store_true",
        help="joint mode: train the fusion head alone on the frozen LM (the probe-only control)",
    )
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--device` and `--precision` (`models/device.py`), shared with `nlpctr experiment`.

    Args:
        parser: the command's parser, which gets the two flags.
    """
    parser.add_argument("--device", default=None, help=f"{DEVICE_CHOICES} (default: the config's, auto)")
    parser.add_argument(
        "--precision",
        default=None,
        choices=("auto", *PRECISIONS),
        help="the LM's precision (default: the config's; auto: bf16 on CUDA, fp32 on the CPU)",
    )


@dataclass(frozen=True)
class TrainRequest:
    """One `nlpctr train` run, as its flags say it (None: the configuration's value)."""

    mode: Mode
    data_dir: Path
    run: str
    runs_dir: Path = Path("runs")
    fusion: Fusion | None = None  # joint mode; defaults to `score`
    encoder: str | None = None  # an installed package or a model folder (the config's encoder.name)
    layers: int | None = None
    epochs: int | None = None  # E2: of the LM step
    seed: int | None = None
    config_file: Path | None = None
    init_from: str | None = None  # joint mode: an E0 run in runs_dir
    streaming: bool | None = None  # None: stream above STREAMING_ROWS impressions
    progress: bool = True
    probe_only: bool = False  # joint mode: the probe stage alone (the probe-only control)
    device: str | None = None  # auto, cpu, cuda, cuda:N (None: the config's)
    precision: str | None = None  # auto, bf16, fp16, fp32 (None: the config's)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainRequest:
        return request_from_args(
            cls,
            args,
            mode=Mode(args.mode),
            data_dir=args.data,
            fusion=Fusion(args.fusion) if args.fusion else None,
            config_file=args.config,
            progress=not args.no_progress,
        )

    def checked(self) -> TrainRequest:
        """The request with joint's default fusion; flags that do not apply to the mode refused."""
        if self.mode != Mode.JOINT and self.fusion is not None:
            raise UserError(f"--fusion applies to --mode joint only (got --mode {self.mode})")
        if self.mode != Mode.JOINT and self.init_from is not None:
            raise UserError(f"--init-from applies to --mode joint only (got --mode {self.mode})")
        if self.probe_only and (self.mode != Mode.JOINT or self.init_from is None):
            raise UserError("--probe-only applies to --mode joint with --init-from E0RUN (a probe needs E0)")
        return replace(self, fusion=self.fusion or Fusion.SCORE) if self.mode == Mode.JOINT else self

    def overrides(self) -> JsonObject:
        """The flags that override the configuration, as a config layer."""
        overrides: JsonObject = {}
        if self.epochs is not None:
            # E2's expensive step is the LM's; its CTR step keeps the configured (E0) budget.
            overrides["lm_loop" if self.mode == Mode.CASCADE_FINETUNED else "loop"] = {"epochs": self.epochs}
        if self.seed is not None:
            for key in ("loop", "lm_loop"):
                overrides.setdefault(key, {})["seed"] = self.seed
        if self.layers is not None:
            overrides["encoder"] = {"layers": self.layers}
        if self.probe_only:
            overrides["recipe"] = {"lm_stage": False}
        if self.encoder is not None:  # stored canonical: a folder by its absolute path
            overrides.setdefault("encoder", {})["name"] = canonical_name(self.encoder)
        for key in ("device", "precision"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        return overrides


@dataclass(frozen=True)
class TrainResult:
    """A finished run: what its results.json holds, and the typed parts callers read."""

    run_dir: Path
    results: JsonObject  # RUN/results.json
    summary: str  # one line
    fit: FitResult
    lm_step: LmStep | None  # E2's LM step


def run_dir_of(runs_dir: Path, name: str) -> Path:
    """The folder of run `name` in `runs_dir` (`nlpctr evaluate` finds runs by it too).

    Args:
        runs_dir: the folder of runs (`--runs-dir`); it need not exist yet.
        name: the run's name (`--run`), a plain folder name.

    Returns:
        The absolute path RUNS/NAME.

    Raises:
        UserError: a name that is not a plain folder name, or a `runs_dir` that is a file.
    """
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--run must be a plain folder name, got {name!r}")
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise UserError(f"--runs-dir {runs_dir} is not a folder")
    return Path(runs_dir).resolve() / name


def code_version() -> str:
    """The code a run was trained with (results.json's provenance; `nlpctr experiment` records it).

    Returns:
        nlpctr's version plus `git describe` of the checkout when there is one.
    """
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{nlpctr.__version__}+{described}" if described else nlpctr.__version__


def global_ctr(data_dir: Path) -> float:
    """The global training CTR the CTR job smoothed toward (what a never-seen key gets).

    Args:
        data_dir: a prepared dataset folder.

    Returns:
        The CTR recorded in its CTR history's meta file.

    Raises:
        UserError: the folder has no CTR history, or its meta file is damaged.
    """
    path = data_dir / CTR_HISTORY / CTR_META
    if not path.is_file():
        raise UserError(f"{data_dir} has no CTR history; run `nlpctr ctr-stats --data {data_dir}`")
    try:
        return float(json.loads(path.read_text())["global_ctr"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged; rerun `nlpctr ctr-stats --data {data_dir}`") from None


def same_run(recorded: JsonObject, identity: JsonObject) -> bool:
    """Whether a run folder's config.json names the same run as `identity`: the same flags, and
    configurations equal once typed (what an older config.json leaves out is the default)."""
    flags = {k: v for k, v in recorded.items() if k != "config"}
    if flags != {k: v for k, v in identity.items() if k != "config"}:
        return False
    try:
        return TrainConfig.from_dict(recorded.get("config") or {}).identity() == identity["config"]
    except UserError:
        return False


def use_streaming(manifest: Manifest, requested: bool | None) -> bool:
    """`--streaming` / `--in-memory` when given, else stream above STREAMING_ROWS impressions."""
    if requested is not None:
        return requested
    return manifest.rows_written > STREAMING_ROWS


def check_writable(data_dir: Path, mode: str, streamed: bool) -> None:
    """What a run writes into the data folder, checked writable before the run folder is made."""
    if streamed:
        require_writable(
            data_dir / TRAINING,
            "`train --streaming` writes its training shards there; make it writable, or pass --in-memory",
        )
    if Mode(mode).trains_lm:
        require_writable(
            data_dir / LM_FEATURES,
            f"--mode {mode} writes its LM's feature there and registers it in the store; make it writable",
        )


def set_up(request: TrainRequest) -> RunSetup:
    """Check the request, load its configuration and claim its run folder (writing config.json).

    Args:
        request: the run as its flags (or `nlpctr experiment`) say it.

    Returns:
        The checked request with everything its mode's training reads.

    Raises:
        UserError: a bad request or configuration, a run folder holding another configuration or
            not writable, a data folder that cannot be trained on (named with its fix).
    """
    data_dir = request.data_dir.resolve()
    manifest = Manifest.read(data_dir)
    request = request.checked()
    config = load_config(request.mode, request.config_file, request.overrides())
    placement = config.placement
    run_dir = run_dir_of(request.runs_dir, request.run)
    identity = {
        "mode": request.mode,
        "fusion": request.fusion,
        "data_dir": str(data_dir),
        "config": config.identity(),
    }
    warm_start = None
    if request.init_from:
        identity["init_from"] = request.init_from
        warm_start = TrainedRun.load(run_dir_of(request.runs_dir, request.init_from), placement)
        if warm_start.spec["mode"] != Mode.BASELINE:
            raise UserError(
                f"--init-from needs an E0 (--mode baseline) run; {request.init_from} is "
                f"{warm_start.spec['mode']}"
            )
    # A run writes into its folder: a new or empty one, or an earlier run's (its config.json).
    claim_output_dir(run_dir, "train", flag="--runs-dir/--run")
    config_file = RunLayout(run_dir).config
    if config_file.is_file() and not same_run(json.loads(config_file.read_text()), identity):
        raise UserError(
            f"run {request.run} exists with another configuration ({config_file}); "
            f"use another --run or delete {run_dir}"
        )
    # What the data folder lacks is refused before the run folder is made: no half-built run.
    check_splits(manifest, data_dir)
    fill_ctr = global_ctr(data_dir)
    streamed = use_streaming(manifest, request.streaming)  # every mode streams
    check_writable(data_dir, request.mode, streamed)
    store = feature_store.open_store(data_dir)  # missing, stale or damaged: one line now
    feature_store.check_current(store, data_dir)
    if not streamed:  # the in-memory frame comes from Feast's offline store
        feature_store.check_duckdb_path(data_dir, store.config.offline_store.type)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--runs-dir/--run {run_dir} cannot be created ({exc.strerror})") from None
    write_json(config_file, identity)
    slug = lm_feature_slug(request.run)
    return RunSetup(
        request,
        data_dir,
        manifest,
        config,
        identity,
        run_dir,
        slug,
        fill_ctr,
        streamed,
        warm_start,
        placement,
    )


# ------------------------------------------------------------------------------- the run's files


def train(request: TrainRequest) -> TrainResult:
    """Train one run and write its folder: config.json, run.json, checkpoints/, predictions, results.

    Args:
        request: the run as its flags (or `nlpctr experiment`) say it.

    Returns:
        The finished run: its results.json content, a one-line summary, the fit and E2's LM step.

    Raises:
        UserError: a bad request or configuration, a data folder that cannot be trained on (an
            empty split, a damaged file, named with the command that rebuilds it), a damaged
            checkpoint to resume from.
    """
    # A damaged file named, with its fix; the LM's frozen-prefix states computed once per data
    # folder and reused by its other runs (models/state_store.py).
    with prepared.reading(request.data_dir), persisted_states(lm_cache_dir(request.data_dir.resolve())):
        return _train(request)


def _train(request: TrainRequest) -> TrainResult:
    started = time.perf_counter()
    setup = set_up(request)
    request = setup.request
    trained = TRAIN_MODE[request.mode](setup)
    result, run_dir, manifest, config = trained.fit, setup.run_dir, setup.manifest, setup.config
    assert result.checkpoint is not None
    spec = {
        **setup.identity,
        "service": trained.service,
        # score-batch and evaluate refuse another dataset's rows: one of another name, or of
        # the same name prepared from another spec (two simulated logs are both `log`)
        **DatasetIdentity.of_manifest(manifest).to_json(),
        "checkpoint": str(result.checkpoint.relative_to(run_dir)),
        "preprocessing": trained.pre.to_json(),
        "train_ctr": trained.train_ctr,
        "streaming": setup.streamed,
        "placement": setup.placement.to_dict(),  # where it trained; `TrainedRun.load` picks its own
    }
    if trained.texts is not None and request.mode == Mode.JOINT:
        spec["text_with_query"] = trained.texts.with_query  # the width of its pair vectors
    write_json(RunLayout(run_dir).run, spec)
    wall = time.perf_counter() - started
    report = trained.report
    results = {
        "dataset": manifest.dataset,
        "run": request.run,
        "seed": config.loop.seed,
        "split": manifest.split.mode,
        "mode": request.mode,
        "fusion": request.fusion,
        "layers": config.encoder.layers if Mode(request.mode).trains_lm else None,
        "epochs": epochs_trained(result),
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "steps": result.steps,
        "evaluations": len(result.history),
        "best_valid_logloss": result.best.valid_logloss,
        "history": result.history_json(),
        "stages": result.stages or None,
        "budget": lm_budget(trained, result),
        "encoder": asdict(config.encoder) if Mode(request.mode).trains_lm else None,
        "wall_seconds": wall,
        "fit_wall_seconds": result.wall_seconds,
        "eval_seconds": result.eval_seconds,
        "train_rows_per_s": result.train_rows_per_s,
        "metrics": {"test": report},
        "lm": trained.lm_step.to_dict() if trained.lm_step else None,
        "supplementary_feature_view": trained.supplementary_view,
        "config": config.to_dict(),
        "placement": setup.placement.to_dict(),
        "provenance": {
            "dataset": manifest.dataset,
            "data_dir": str(setup.data_dir),
            "spec_hash": manifest.spec_hash,
            "split_mode": manifest.split.mode,
            "split_seed": manifest.split.seed,
            "encoder_version": trained.encoder_version,
            "code_version": code_version(),
            "feature_service": trained.service,
            "group": manifest.group,
        },
    }
    write_json(RunLayout(run_dir).results, results, sort_keys=False, default=float)
    label = request.mode + (f"/{request.fusion}" if request.fusion else "")
    stages = f"; valid logloss {stage_summary(result.stages)}" if result.stages else ""
    summary = (
        f"train {request.run} ({label}, {manifest.dataset}): test AUC {report['auc']:.4f} "
        f"[{report['auc_ci'][0]:.4f}, {report['auc_ci'][1]:.4f}], GAUC {report['gauc']:.4f}, "
        f"logloss {report['logloss']:.4f}, RIG {report['rig']:.4f}, calibration "
        f"{report['calibration']['ratio']:.3f}; best epoch {result.best_epoch + 1}/{epochs_trained(result)}"
        f"{stages}; {wall:.1f} s -> {run_dir}"
    )
    return TrainResult(run_dir, results, summary, result, trained.lm_step)


def run(argv: list[str] | None = None) -> JsonObject:
    """`nlpctr train`.

    Args:
        argv: the command line after `train` (None: sys.argv's).

    Returns:
        The run's results (results.json's content) with a one-line `summary`.

    Raises:
        UserError: as `train` raises.
    """
    trained = train(TrainRequest.from_args(parse_args(argv)))
    return {**trained.results, "summary": trained.summary}
