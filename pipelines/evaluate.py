"""Re-evaluate a trained run on its test split, optionally against a baseline run.

    nlpctr evaluate --run NAME [--baseline RUN] [--runs-dir runs]

Rebuilds the model from `RUNS/NAME/run.json` and its best checkpoint, reads the test rows from
the same Feast service it was trained on, recomputes the metrics (group-bootstrap CIs), checks
the predictions against the ones `train` saved, and with `--baseline` adds the paired bootstrap
ΔAUC / ΔRIG / ΔGAUC (95% CIs) to `results.json` under `delta_vs_baseline`. A run trained
streaming is evaluated the same way: test shards streamed, metrics accumulated
(`models.streaming_metrics.StreamingMetrics`), the LM's vector of each unique text computed once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from nlpctr.atomic import write_json
from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.layout import DatasetIdentity, Manifest, RunLayout
from nlpctr.models import streaming, streaming_metrics
from nlpctr.models.evaluation import delta_fields, delta_summary, metric_report, paired_delta
from nlpctr.models.prediction import labels_of
from nlpctr.models.runs import TrainedRun
from nlpctr.models.streamed_training import streamed_test
from nlpctr.pipelines.train import run_dir_of


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--baseline", default=None, help="a run to compare with on the same test rows")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    return parser.parse_args(argv)


def test_predictions(run_dir: Path) -> tuple[TrainedRun, pd.DataFrame, Any]:
    """The run's model applied to its test rows: (run, frame of impression_id/p, labels)."""
    trained = TrainedRun.load(run_dir)
    frame = feature_store.training_frame(Path(trained.spec["data_dir"]), trained.spec["service"], ["test"])
    data, p = trained.predict_frame(frame)
    labels = labels_of(data, torch.arange(len(p)))
    return trained, pd.DataFrame({"impression_id": data.impression_id, "p": p}), labels


def streamed_test_metrics(run_dir: Path) -> tuple[TrainedRun, streaming_metrics.StreamingMetrics, float]:
    """A streamed run's model applied to its test shards: (run, metrics, max |p - train's p|)."""
    trained = TrainedRun.load(run_dir)
    root = feature_store.write_training_shards(Path(trained.spec["data_dir"]), trained.spec["service"])
    pre = trained.pre
    source = streaming.ShardSource(root, pre.tensorize, streaming.needed_columns(pre.columns, pre.group))
    texts = trained.text_batcher() if trained.lm is not None else None
    fresh = run_dir / ".evaluate-predictions.parquet"
    scored = streamed_test(trained.model, source, texts, fresh)
    new, old = (
        pq.read_table(fresh),
        pq.read_table(saved_predictions_path(run_dir)),
    )  # both in test-shard order
    fresh.unlink()
    if (
        new.num_rows != old.num_rows
        or not pc.all(pc.equal(new["impression_id"], old["impression_id"])).as_py()
    ):
        raise UserError(f"the test rows of {run_dir} changed since training; re-train the run")
    diff = pc.max(pc.abs(pc.subtract(new["p"], old["p"]))).as_py() if new.num_rows else 0.0
    return trained, scored, float(diff or 0.0)


def saved_predictions_path(run_dir: Path) -> Path:
    path = RunLayout(run_dir).predictions
    if not path.is_file():
        raise UserError(f"{run_dir} has no {RunLayout.PREDICTIONS}; train the run first")
    return path


def saved_test_predictions(run_dir: Path) -> pa.Table:
    """The test rows of a run's saved predictions (the file holds its validation rows too), in
    the order training wrote them."""
    table = pq.read_table(saved_predictions_path(run_dir))
    return table.filter(pc.equal(table["split"], "test"))


def saved_predictions(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(saved_predictions_path(run_dir))


def check_data_folder(trained: TrainedRun) -> None:
    """Refuse a run whose data folder holds another dataset than it was trained on: re-prepared
    from another spec since (another log of the same name included), its test rows would be
    scored and the metrics written into the run's results.json without a word."""
    data_dir = Path(trained.spec["data_dir"])
    here = DatasetIdentity.of_manifest(Manifest.read(data_dir))
    recorded = DatasetIdentity.of_run(trained.directory, trained.spec)
    if not recorded.admits(here):
        raise UserError(
            f"run {trained.directory.name} was trained on dataset {recorded.describe()} in {data_dir}, "
            f"which now holds {here.describe()}: its metrics would be another dataset's; prepare "
            f"{data_dir} again from the run's spec, or train a new run on the folder as it is"
        )


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Recompute a run's test metrics (and the delta vs a baseline) into its results.json."""
    args = parse_args(argv)
    run_dir = run_dir_of(args.runs_dir, args.run)
    trained = TrainedRun.load(run_dir)
    check_data_folder(trained)
    if trained.spec.get("streaming"):
        return run_streamed(args, run_dir)
    trained, predicted, labels = test_predictions(run_dir)
    evaluation = trained.config.evaluation
    p = predicted["p"].to_numpy()
    report = metric_report(labels, p, trained.spec["train_ctr"], evaluation)
    saved = saved_predictions(run_dir).set_index("impression_id").reindex(predicted["impression_id"])
    max_diff = float(np.max(np.abs(saved["p"].to_numpy() - p))) if len(p) else 0.0
    results_path = RunLayout(run_dir).results
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("metrics", {})["test"] = report
    results["evaluate"] = {"rows": len(p), "max_abs_diff_vs_train_predictions": max_diff}
    summary = (
        f"evaluate {args.run}: test AUC {report['auc']:.4f}, GAUC {report['gauc']:.4f}, "
        f"RIG {report['rig']:.4f}"
    )
    if args.baseline:
        base = saved_predictions(run_dir_of(args.runs_dir, args.baseline)).set_index("impression_id")
        aligned = base.reindex(predicted["impression_id"])["p"].to_numpy()
        if np.isnan(aligned).any():
            raise UserError(f"baseline {args.baseline} did not predict the same test rows as {args.run}")
        delta = paired_delta(labels, p, aligned, trained.spec["train_ctr"], evaluation)
        results["delta_vs_baseline"] = {"baseline": args.baseline, **delta}
        summary += delta_summary(args.baseline, delta)
    write_json(results_path, results, sort_keys=False, default=float)
    return {**results, "summary": summary + f"; max |p - train's p| {max_diff:.2e}"}


def run_streamed(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """`run` for a run trained streaming: the same report, streamed."""
    trained, scored, max_diff = streamed_test_metrics(run_dir)
    evaluation = trained.config.evaluation
    rounds, seed = evaluation.bootstrap_rounds, evaluation.bootstrap_seed
    train_ctr = trained.spec["train_ctr"]
    report = scored.report(train_ctr, rounds, seed, evaluation.calibration_bins)
    results_path = RunLayout(run_dir).results
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("metrics", {})["test"] = report
    results["evaluate"] = {
        "rows": report["rows"],
        "max_abs_diff_vs_train_predictions": max_diff,
        "streamed": True,
    }
    write_json(results_path, results, sort_keys=False, default=float)
    summary = (
        f"evaluate {args.run} (streamed): test AUC {report['auc']:.4f}, GAUC {report['gauc']:.4f}, "
        f"RIG {report['rig']:.4f}"
    )
    if args.baseline:
        # Both runs predicted the test shards in their order; the baseline's p lines up row by row.
        base = saved_test_predictions(run_dir_of(args.runs_dir, args.baseline))
        ours = saved_test_predictions(run_dir)
        if (
            base.num_rows != ours.num_rows
            or not pc.all(pc.equal(base["impression_id"], ours["impression_id"])).as_py()
        ):
            raise UserError(f"baseline {args.baseline} did not predict the same test rows as {args.run}")
        delta = scored.paired_delta(scored.rescored(base["p"].to_numpy()), train_ctr, rounds, seed)
        out = delta_fields(delta)
        results["delta_vs_baseline"] = {"baseline": args.baseline, **out}
        summary += delta_summary(args.baseline, out)
    write_json(results_path, results, sort_keys=False, default=float)
    return {**results, "summary": summary + f"; max |p - train's p| {max_diff:.2e}"}
