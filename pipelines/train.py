"""Train a CTR model on a prepared dataset's Feast features, and evaluate it offline.

    nlpctr train --mode {baseline,cascade-frozen,cascade-finetuned,joint} [--fusion score|concat|gate]
                 [--layers K] [--epochs N] [--seed S] --data DIR --run NAME [--runs-dir runs]
                 [--config FILE] [--streaming | --in-memory] [--no-progress]
    nlpctr evaluate --run NAME [--baseline RUN] [--runs-dir runs]

Modes (DESIGN.md, experiment protocol): `baseline` (E0) reads the `baseline` service;
`cascade-frozen` (E1) reads `cascade_frozen` (+ frozen text vectors); `cascade-finetuned` (E2)
first fine-tunes the LM alone on clicks (stopped at peak validation AUC, every epoch kept),
writes each epoch's score and pooled vector per text pair to `DIR/lm_features/<run>/epoch-<k>/`,
registers the chosen epoch as the Feast view `lm_<run>` (service `cascade_finetuned_<run>`), then
trains E0 + that feature; `joint` (E3) trains the LM and E0 end to end through a fusion by the
recipe of `models.joint` (warm-started from `--init-from E0RUN`: stage 1 with E0's tower frozen,
stage 2 with it unfrozen at its own learning rate, each validated from step 0 on and keeping its
best state) and writes the LM's output back the same way (service `joint_<run>`). One loop
(`models.trainer.fit`) trains everything; configuration comes from `models/configs/default.yaml`
(+ `--config`).

Above STREAMING_ROWS impressions (or with `--streaming`) the training frame is not loaded: the
point-in-time join runs in DuckDB into parquet shards (`features.store.write_training_shards`),
the loop reads them as a stream (`models.streaming.ShardSource`) and test metrics are streamed
(`models.metrics.StreamingMetrics`); modes baseline, cascade-frozen and joint.

Writes `RUNS/NAME/`: `config.json`, `run.json` (what `evaluate` and batch scoring rebuild the model
from), `checkpoints/`, `predictions.parquet` (test rows), `results.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import nlpctr
from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.features.job_outputs import Layout
from nlpctr.features.names import BASELINE, CASCADE_FROZEN, lm_feature_slug, lm_view_name
from nlpctr.layout import (
    CTR_HISTORY,
    CTR_META,
    LmFeatureMeta,
    lm_features_dir,
    pair_key_columns,
    read_manifest,
)
from nlpctr.models import experiment, metrics, streaming
from nlpctr.models.ctr_net import FUSIONS
from nlpctr.models.data import BatchSource, FeatureColumns, Tensors
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.joint import fit_joint, stage_summary
from nlpctr.models.trainer import FitResult, TextBatcher, fit, labels_of, predict, predict_batches
from nlpctr.pipelines.ownership import claim_output_dir

STREAMING_ROWS = 500_000  # impressions above which `train` streams (a frame of ~1 GB in memory)
STREAMING_MODES = ("baseline", "cascade-frozen", "joint")
TEXT_CACHE = 300_000  # unique texts whose LM vectors one evaluation pass keeps (<= 460 MB at 384-d)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr train", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=experiment.MODES)
    parser.add_argument("--fusion", choices=FUSIONS, default=None, help="joint mode: how the LM joins")
    parser.add_argument("--layers", type=int, default=None, help="LM depth (E2, E3): first K MiniLM layers")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run_dir_of(runs_dir: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--run must be a plain folder name, got {name!r}")
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise UserError(f"--runs-dir {runs_dir} is not a folder")
    return Path(runs_dir).resolve() / name


def code_version() -> str:
    """nlpctr's version plus `git describe` of the checkout when there is one."""
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
    """The global training CTR the CTR job smoothed toward (what a never-seen key gets)."""
    path = data_dir / CTR_HISTORY / CTR_META
    if not path.is_file():
        raise UserError(f"{data_dir} has no CTR history; run `nlpctr ctr-stats --data {data_dir}`")
    return float(json.loads(path.read_text())["global_ctr"])


def train_ctr(labels: metrics.Labels) -> float:
    return float(labels.clicks.sum() / max(labels.impressions.sum(), 1))


def frozen_encoder_version(data_dir: Path, frame: pd.DataFrame) -> str | None:
    """The encoder behind the frame's frozen text vectors (from the embedding view's folder)."""
    slugs = {c[len("ad_text_") : -len("__embedding")] for c in frame.columns if c.startswith("ad_text_")}
    versions = [e.encoder_version for e in Layout.discover(data_dir).embeddings if e.slug in slugs]
    return versions[0] if versions else None


# ------------------------------------------------------------------------------- LM features


def has_query_text(frame: pd.DataFrame) -> bool:
    return "query_text_id" in frame and bool(frame["query_text_id"].notna().any())


def write_lm_features(
    folder: Path, pairs: pd.DataFrame, outputs: dict[str, np.ndarray], model_version: str, with_query: bool
) -> None:
    """One parquet of the LM's outputs per text pair, keyed as the Feast view reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    columns: dict[str, pa.Array] = {}
    for key in pair_key_columns(with_query):  # the same columns the run's _meta.json names as keys
        columns[key] = pa.array(pairs[key], pa.string())
    columns["event_timestamp"] = pa.array(
        pd.to_datetime(pairs["event_timestamp"], utc=True), pa.timestamp("us", tz="UTC")
    )
    for name, values in outputs.items():
        if values.ndim == 1:
            columns[name] = pa.array(values.astype(np.float32), pa.float32())
        else:
            flat = pa.array(values.astype(np.float32, copy=False).reshape(-1))  # no per-row Python objects
            rows = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
            columns[name] = rows.cast(pa.list_(pa.float32()))
    columns["model_version"] = pa.array([model_version] * len(pairs), pa.string())
    pq.write_table(pa.table(columns), folder / "part-0.parquet")


def publish_lm_features(data_dir: Path, meta: LmFeatureMeta) -> str:
    """Name the chosen epoch, register the view and materialise it; returns the view name."""
    meta.write(lm_features_dir(data_dir, meta.run))
    feature_store.reapply(data_dir)
    view = lm_view_name(meta.run)
    feature_store.materialize(data_dir, views=[view])
    return view


def lm_feature_root(data_dir: Path, slug: str) -> Path:
    folder = lm_features_dir(data_dir, slug)
    shutil.rmtree(folder, ignore_errors=True)  # a re-run replaces the run's features whole
    return folder


# ------------------------------------------------------------------------------- training


def fit_ctr(
    frame: pd.DataFrame,
    columns: FeatureColumns,
    manifest: dict[str, Any],
    config: dict[str, Any],
    fill_ctr: float,
    checkpoints: Path,
    fusion: str | None,
    progress: bool,
    warm_start: experiment.TrainedRun | None = None,
) -> tuple[experiment.Preprocessing, Tensors, torch.nn.Module, TextBatcher | None, FitResult]:
    """Tensors, model (with a trainable LM when there is a fusion) and the fitted loop;
    `warm_start` (an E0 run on the same inputs) initialises the CTR tower."""
    pre = experiment.Preprocessing.fit(frame, columns, manifest["group"], fill_ctr)
    data = pre.tensorize(frame)
    texts = None
    if fusion:
        lm = TextEncoder(experiment.encoder_config(config), trainable=True)
        texts = TextBatcher.for_data(lm, data)
    model = experiment.build_model(pre, config, fusion, texts.lm.dim if texts else 0)
    if warm_start is not None:
        start_from(model, pre, warm_start)
    result = train_model(model, data, config, checkpoints, texts, warm_start is not None, progress)
    return pre, data, model, texts, result


def train_model(
    model: torch.nn.Module,
    data: BatchSource,
    config: dict[str, Any],
    checkpoints: Path,
    texts: TextBatcher | None,
    warm_started: bool,
    progress: bool,
) -> FitResult:
    """`models.trainer.fit`, or the joint recipe (`models.joint.fit_joint`) for a model with an LM."""
    loop = experiment.loop_config(config)
    if texts is None:
        return fit(model, data, loop, checkpoints, progress=progress)
    joint_config = experiment.joint_config(config)
    return fit_joint(model, data, loop, joint_config, checkpoints, texts, warm_started, progress)


def start_from(
    model: torch.nn.Module, pre: experiment.Preprocessing, baseline: experiment.TrainedRun
) -> None:
    """Initialise a joint model's CTR tower from a trained E0 that read the same inputs."""
    if pre.to_json() != baseline.pre.to_json():
        raise UserError(
            f"--init-from {baseline.directory.name} was trained on other inputs (columns or vocabularies "
            "differ); train it on the same data and service"
        )
    model.warm_start(baseline.model)


def train_lm_alone(
    frame: pd.DataFrame,
    manifest: dict[str, Any],
    config: dict[str, Any],
    fill_ctr: float,
    run_dir: Path,
    data_dir: Path,
    slug: str,
    progress: bool,
) -> dict[str, Any]:
    """E2 step 1 and 2: fine-tune the LM on clicks, write every epoch's features, publish the best."""
    pre = experiment.Preprocessing.fit(
        frame, FeatureColumns.for_manifest(manifest), manifest["group"], fill_ctr
    )
    data = pre.tensorize(frame)
    encoder = experiment.encoder_config(config)
    lm = TextEncoder(encoder, trainable=True)
    scorer = experiment.build_scorer(config, lm.dim)
    texts = TextBatcher.for_data(lm, data)
    result = fit(
        scorer,
        data,
        experiment.loop_config(config, "lm_loop"),
        run_dir / experiment.CHECKPOINTS / "lm",
        texts=texts,
        progress=progress,
    )
    test = data.rows("test")
    labels = labels_of(data, test)
    test_auc = metrics.auc(labels, predict(scorer, data, test, texts))

    pairs = experiment.text_pairs(frame)
    root = lm_feature_root(data_dir, slug)
    with_query = has_query_text(frame)
    folders = []
    for entry in result.history:
        epoch = int(entry["epoch"])
        state = torch.load(run_dir / experiment.CHECKPOINTS / "lm" / f"epoch-{epoch}.pt", weights_only=True)
        scorer.load_state_dict(state["model"])
        lm.load_state_dict(state["lm"])
        outputs = experiment.lm_outputs(lm, {"lm_score": scorer.head}, pairs["text"].tolist())
        version = f"{slug}@epoch-{epoch}/{encoder.version}/nlpctr=={nlpctr.__version__}"
        write_lm_features(root / f"epoch-{epoch}", pairs, outputs, version, with_query)
        folders.append(f"epoch-{epoch}")
    chosen = f"epoch-{result.best_epoch}"
    meta = LmFeatureMeta(
        run=slug,
        kind="cascade_finetuned",
        chosen=chosen,
        epochs=tuple(folders),
        keys=tuple(pair_key_columns(with_query)),
        model_version=f"{slug}@{chosen}/{encoder.version}/nlpctr=={nlpctr.__version__}",
        valid_auc={f"epoch-{int(h['epoch'])}": h["valid_auc"] for h in result.history},
    )
    view = publish_lm_features(data_dir, meta)
    return {
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "wall_seconds": result.wall_seconds,
        "test_auc_standalone": test_auc,
        "feature_view": view,
        "features": {f: str(root / f) for f in folders},
        "chosen": chosen,
        "encoder_version": encoder.version,
    }


def write_joint_features(
    model: torch.nn.Module,
    texts: TextBatcher,
    frame: pd.DataFrame,
    config: dict[str, Any],
    data_dir: Path,
    slug: str,
    best_epoch: int,
) -> str:
    """E3: the trained LM's supplementary output per text pair, as the view `lm_<run>`."""
    fusion = model.fusion
    assert fusion is not None
    head = {"lm_score": fusion.score} if fusion.fusion == "score" else {"supplementary": fusion.project}
    pairs = experiment.text_pairs(frame)
    outputs = experiment.lm_outputs(texts.lm, head, pairs["text"].tolist())
    # The view serves the supplementary output alone: nothing reads a joint run's 384-d pooled
    # vector, and with it the view is 12x larger (the concat/gate output is 32-d), which is what
    # the online write of millions of pairs holds in memory at once.
    del outputs["lm_embedding"]
    encoder = experiment.encoder_config(config)
    chosen = f"epoch-{best_epoch}"
    version = f"{slug}@{chosen}/joint-{fusion.fusion}/{encoder.version}/nlpctr=={nlpctr.__version__}"
    with_query = has_query_text(frame)
    write_lm_features(lm_feature_root(data_dir, slug) / chosen, pairs, outputs, version, with_query)
    meta = LmFeatureMeta(
        run=slug,
        kind="joint",
        chosen=chosen,
        epochs=(chosen,),
        keys=tuple(pair_key_columns(with_query)),
        model_version=version,
        fusion=fusion.fusion,
    )
    return publish_lm_features(data_dir, meta)


# ------------------------------------------------------------------------------- streaming


def use_streaming(manifest: dict[str, Any], requested: bool | None) -> bool:
    """`--streaming` / `--in-memory` when given, else stream above STREAMING_ROWS impressions."""
    if requested is not None:
        return requested
    return int(manifest.get("rows_written", 0)) > STREAMING_ROWS


def stream_source(
    data_dir: Path, service: str, manifest: dict[str, Any], fill_ctr: float
) -> tuple[experiment.Preprocessing, streaming.ShardSource]:
    """The service's training frame as parquet shards (DuckDB point-in-time join), the run's
    preprocessing fitted on the training shards, and a stream of Tensors over them."""
    root = feature_store.write_training_shards(data_dir, service)
    names = pq.read_schema(next(iter(sorted(root.glob("*/*.parquet"))))).names
    cascade = [c for c in names if c.endswith("__embedding")] if service == CASCADE_FROZEN else []
    columns = FeatureColumns.for_manifest(manifest, cascade=cascade)
    dims = []
    for column in cascade:
        width = streaming.first_vector_width(root, column)
        if width is None:
            raise UserError(f"feature column {column} is null on every row; re-run the job behind it")
        dims.append(width)
    group = manifest["group"]
    vocabularies = streaming.fit_vocabularies(root, columns.categorical)
    pre = experiment.Preprocessing(columns, vocabularies, fill_ctr, tuple(dims), group)
    return pre, streaming.ShardSource(root, pre.tensorize, streaming.needed_columns(columns, group))


def streamed_test(
    model: torch.nn.Module, source: streaming.ShardSource, texts: TextBatcher | None, predictions: Path
) -> metrics.StreamingMetrics:
    """One in-order pass over the test shards: metrics accumulated and each batch's predictions
    appended to `predictions` (parquet, published when complete), nothing else kept."""
    scored = metrics.StreamingMetrics()
    staging = predictions.with_name(f".{predictions.name}.tmp")
    schema = pa.schema([("impression_id", pa.string()), ("split", pa.string()), ("p", pa.float64())])
    with pq.ParquetWriter(staging, schema) as writer:

        def each(batch: Tensors, p: np.ndarray) -> None:
            labels = metrics.Labels(
                batch.impressions.numpy().astype(np.int64),
                batch.clicks.numpy().astype(np.int64),
                batch.groups,
            )
            scored.add(labels, p)
            ids = pa.array(batch.impression_id, pa.string())
            writer.write_table(pa.table([ids, pa.array(["test"] * len(p)), pa.array(p)], schema=schema))

        predict_batches(model, source.batches("test", 1024), texts, each)
    staging.replace(predictions)
    return scored


def train_streaming(
    data_dir: Path,
    service: str,
    manifest: dict[str, Any],
    config: dict[str, Any],
    fill_ctr: float,
    run_dir: Path,
    fusion: str | None,
    progress: bool,
    warm_start: experiment.TrainedRun | None = None,
) -> tuple[experiment.Preprocessing, torch.nn.Module, TextBatcher | None, FitResult, dict[str, Any], float]:
    """`fit_ctr` and the test pass on shards: (preprocessing, model, LM batcher, fit, test report,
    train CTR); predictions are written to the run folder as they are made."""
    pre, source = stream_source(data_dir, service, manifest, fill_ctr)
    texts = None
    if fusion:
        lm = TextEncoder(experiment.encoder_config(config), trainable=True)
        texts = TextBatcher(lm, cache_limit=TEXT_CACHE)
    model = experiment.build_model(pre, config, fusion, texts.lm.dim if texts else 0)
    if warm_start is not None:
        start_from(model, pre, warm_start)
    checkpoints = run_dir / experiment.CHECKPOINTS / "ctr"
    result = train_model(model, source, config, checkpoints, texts, warm_start is not None, progress)
    _, impressions, clicks = streaming.split_totals(source.root, "train")
    ctr_train = clicks / max(impressions, 1)
    scored = streamed_test(model, source, texts, run_dir / experiment.PREDICTIONS_FILE)
    evaluation = config["evaluation"]
    report = scored.report(
        ctr_train,
        int(evaluation["bootstrap_rounds"]),
        int(evaluation["bootstrap_seed"]),
        int(evaluation["calibration_bins"]),
    )
    return pre, model, texts, result, report, ctr_train


def epochs_trained(result: FitResult) -> int:
    """Epochs a fit went through (summed over the joint recipe's stages)."""
    last: dict[Any, int] = {}
    for entry in result.history:
        key = entry.get("stage")
        last[key] = max(last.get(key, 0), int(entry["epoch"]) + 1)
    return sum(last.values())


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Train one run; returns its results with a one-line `summary`."""
    args = parse_args(argv)
    started = time.perf_counter()
    data_dir: Path = args.data.resolve()
    manifest = read_manifest(data_dir)
    if args.mode == "joint" and args.fusion is None:
        args.fusion = "score"
    if args.mode != "joint" and args.fusion is not None:
        raise UserError(f"--fusion applies to --mode joint only (got --mode {args.mode})")
    if args.mode != "joint" and args.init_from is not None:
        raise UserError(f"--init-from applies to --mode joint only (got --mode {args.mode})")
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        # E2's expensive step is the LM's; its CTR step keeps the configured (E0) budget.
        overrides["lm_loop" if args.mode == "cascade-finetuned" else "loop"] = {"epochs": args.epochs}
    if args.seed is not None:
        for key in ("loop", "lm_loop"):
            overrides.setdefault(key, {})["seed"] = args.seed
    if args.layers is not None:
        overrides["encoder"] = {"layers": args.layers}
    config = experiment.load_config(args.mode, args.config, overrides)
    run_dir = run_dir_of(args.runs_dir, args.run)
    slug = lm_feature_slug(args.run)
    identity = {"mode": args.mode, "fusion": args.fusion, "data_dir": str(data_dir), "config": config}
    if args.init_from:
        identity["init_from"] = args.init_from
    warm_start = None
    if args.init_from:
        warm_start = experiment.TrainedRun.load(run_dir_of(args.runs_dir, args.init_from))
        if warm_start.spec["mode"] != "baseline":
            raise UserError(
                f"--init-from needs an E0 (--mode baseline) run; {args.init_from} is "
                f"{warm_start.spec['mode']}"
            )
    # A run writes into its folder: a new or empty one, or an earlier run's (its config.json).
    claim_output_dir(run_dir, "train", flag="--runs-dir/--run")
    config_file = run_dir / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()) != identity:
        raise UserError(
            f"run {args.run} exists with another configuration ({config_file}); "
            f"use another --run or delete {run_dir}"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--runs-dir/--run {run_dir} cannot be created ({exc.strerror})") from None
    config_file.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    fill_ctr = global_ctr(data_dir)
    progress = not args.no_progress
    group = manifest["group"]

    streamed = use_streaming(manifest, args.streaming)
    if streamed and args.mode not in STREAMING_MODES:
        raise UserError(
            f"--mode {args.mode} does not stream yet (modes that do: {', '.join(STREAMING_MODES)}); "
            "use --in-memory on data that fits in memory"
        )
    lm_step: dict[str, Any] | None = None
    if streamed:
        service = CASCADE_FROZEN if args.mode == "cascade-frozen" else BASELINE
        pre, model, texts, result, report, ctr_train = train_streaming(
            data_dir, service, manifest, config, fill_ctr, run_dir, args.fusion, progress, warm_start
        )
        root = feature_store.training_shards_dir(data_dir, service)
        frame = streaming.unique_text_pairs(root) if args.mode == "joint" else pd.DataFrame()
        encoder_version = (
            frozen_encoder_version(data_dir, pd.DataFrame(columns=list(pre.columns.cascade)))
            if args.mode == "cascade-frozen"
            else experiment.encoder_config(config).version
            if args.mode == "joint"
            else None
        )
    else:
        if args.mode == "cascade-finetuned":
            base = feature_store.training_frame(data_dir, BASELINE)
            lm_step = train_lm_alone(base, manifest, config, fill_ctr, run_dir, data_dir, slug, progress)
            service = f"cascade_finetuned_{slug}"
            view = lm_view_name(slug)
            frame = feature_store.training_frame(data_dir, service)
            columns = FeatureColumns.for_manifest(
                manifest, cascade=[f"{view}__lm_embedding"], scores=[f"{view}__lm_score"]
            )
            encoder_version = lm_step["encoder_version"]
        else:
            service = CASCADE_FROZEN if args.mode == "cascade-frozen" else BASELINE
            frame = feature_store.training_frame(data_dir, service)
            cascade = (
                [c for c in frame.columns if c.endswith("__embedding")] if service == CASCADE_FROZEN else []
            )
            columns = FeatureColumns.for_manifest(manifest, cascade=cascade)
            encoder_version = (
                frozen_encoder_version(data_dir, frame)
                if args.mode == "cascade-frozen"
                else experiment.encoder_config(config).version
                if args.mode == "joint"
                else None
            )

        pre, data, model, texts, result = fit_ctr(
            frame,
            columns,
            manifest,
            config,
            fill_ctr,
            run_dir / experiment.CHECKPOINTS / "ctr",
            args.fusion,
            progress,
            warm_start,
        )
        test = data.rows("test")
        p_test = predict(model, data, test, texts)
        labels = labels_of(data, test)
        ctr_train = train_ctr(labels_of(data, data.rows("train")))
        report = experiment.metric_report(labels, p_test, ctr_train, config["evaluation"])
        pd.DataFrame(
            {"impression_id": data.impression_id[test.numpy()], "split": "test", "p": p_test}
        ).to_parquet(run_dir / experiment.PREDICTIONS_FILE, index=False)

    supplementary = None
    if args.mode == "joint":
        assert texts is not None
        supplementary = write_joint_features(model, texts, frame, config, data_dir, slug, result.best_epoch)
    assert result.checkpoint is not None
    spec = {
        **identity,
        "service": service,
        "checkpoint": str(result.checkpoint.relative_to(run_dir)),
        "preprocessing": pre.to_json(),
        "train_ctr": ctr_train,
        "streaming": streamed,
    }
    (run_dir / experiment.RUN_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    wall = time.perf_counter() - started
    results = {
        "dataset": manifest["dataset"],
        "run": args.run,
        "seed": int(config["loop"]["seed"]),
        "split": manifest["split"]["mode"],
        "mode": args.mode,
        "fusion": args.fusion,
        "layers": int(config["encoder"]["layers"]) if args.mode in ("cascade-finetuned", "joint") else None,
        "epochs": epochs_trained(result),
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "steps": result.steps,
        "evaluations": len(result.history),
        "best_valid_logloss": result.best["valid_logloss"],
        "history": result.history,
        "stages": result.stages or None,
        "wall_seconds": wall,
        "fit_wall_seconds": result.wall_seconds,
        "eval_seconds": result.eval_seconds,
        "train_rows_per_s": result.train_rows_per_s,
        "metrics": {"test": report},
        "lm": lm_step,
        "supplementary_feature_view": supplementary,
        "config": config,
        "provenance": {
            "dataset": manifest["dataset"],
            "data_dir": str(data_dir),
            "spec_hash": manifest.get("spec_hash"),
            "split_mode": manifest["split"]["mode"],
            "split_seed": manifest["split"]["seed"],
            "encoder_version": encoder_version,
            "code_version": code_version(),
            "feature_service": service,
            "group": group,
        },
    }
    (run_dir / experiment.RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
    label = args.mode + (f"/{args.fusion}" if args.fusion else "")
    stages = f"; valid logloss {stage_summary(result.stages)}" if result.stages else ""
    results["summary"] = (
        f"train {args.run} ({label}, {manifest['dataset']}): test AUC {report['auc']:.4f} "
        f"[{report['auc_ci'][0]:.4f}, {report['auc_ci'][1]:.4f}], GAUC {report['gauc']:.4f}, "
        f"logloss {report['logloss']:.4f}, RIG {report['rig']:.4f}, calibration "
        f"{report['calibration']['ratio']:.3f}; best epoch {result.best_epoch + 1}/{epochs_trained(result)}"
        f"{stages}; {wall:.1f} s -> {run_dir}"
    )
    return results
