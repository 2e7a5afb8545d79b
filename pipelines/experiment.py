"""The whole experiment protocol in one command (DESIGN.md, "Experiment protocol").

    nlpctr experiment --dataset NAME [--quick] [--seed S] --out DIR [--config FILE] [--no-progress]
    nlpctr experiment --dataset simulated [--rho 0,0.5,1] [--rows N] [--quick] --out DIR

prepare (Beam) -> CTR history (Beam) -> frozen embeddings (Beam RunInference) -> Feast apply and
materialize -> E0 baseline, E1 cascade-frozen, E2 cascade-finetuned, E3 joint per fusion (each
`nlpctr train`, through Feast) -> E4 distillation (SuKD, feature-KD, no-KD per student depth) ->
redundancy of every NLP feature. Writes `DIR/results.json`, `DIR/report.md` and PNG plots; data
under `DIR/data/`, runs under `DIR/runs/`. Sizes come from `models/configs/experiment.yaml`
(`--quick`: its `quick:` section, a small LM and few steps).

DIR must be new, empty, or an earlier experiment's folder (marked by a hidden `.nlpctr-output`
file, or its results.json); anything else is refused before any work starts.

`--dataset simulated` runs the redundancy sweep instead: for each rho a simulated log
(`nlpctr data simulate`), the protocol without E4, then the trend of each measure against rho,
which must follow the known redundancy (`DIR/rho-<r>/` per value, the sweep in `DIR/results.json`).

Redundancy increments (E0 + one feature) are trained in memory on the cascade-frozen training
frame, the LM features joined on their (query_text_id, ad_text_id) key: each LM feature has one
row per key, stamped at the key's first impression, so this join gives what Feast's
point-in-time join gives (E2's chosen checkpoint, trained both ways, is checked to agree).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.features.names import CASCADE_FROZEN, lm_feature_slug
from nlpctr.layout import lm_features_dir, pair_key_columns, read_manifest
from nlpctr.models import ceilings, claims, distill, experiment, metrics, redundancy, report, sweep
from nlpctr.models.data import FeatureColumns
from nlpctr.models.trainer import TextBatcher, labels_of, pair_text, predict
from nlpctr.pipelines import train
from nlpctr.pipelines.cli import resolve
from nlpctr.pipelines.ownership import claim_output_dir
from nlpctr.pipelines.specs import load_spec

PROTOCOL = Path(__file__).resolve().parents[1] / "models" / "configs" / "experiment.yaml"
SIMULATED = "simulated"
JOB = "experiment"
BASELINE_RUN = "baseline"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"bundled dataset, spec YAML, or {SIMULATED!r}")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--quick", action="store_true", help="small LM, few steps (minutes on a laptop)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--config", type=Path, default=None, help="YAML merged over the protocol sizes")
    parser.add_argument("--rho", default=None, help="simulated: comma-separated redundancy values")
    parser.add_argument("--rows", type=int, default=None, help="simulated: rows per log")
    parser.add_argument(
        "--impressions-per-row",
        type=int,
        default=None,
        help="simulated: aggregated rows of N impressions each (0: one binary impression per row)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def load_protocol(quick: bool, config_file: Path | None, simulated: bool = False) -> dict[str, Any]:
    """experiment.yaml (for the sweep, its `simulator.train_config` over `train_config`), its
    `quick:` section when asked, then `--config`."""
    protocol = yaml.safe_load(PROTOCOL.read_text())
    quick_section = protocol.pop("quick")
    if simulated:
        sweep_settings = protocol["simulator"]
        overrides = {"train_config": sweep_settings.get("train_config") or {}}
        if "fusions" in sweep_settings:  # before `quick:`, whose own list the quick sweep keeps
            overrides["fusions"] = sweep_settings["fusions"]
        protocol = experiment.deep_merge(protocol, overrides)
    if quick:
        protocol = experiment.deep_merge(protocol, quick_section)
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"--config {config_file} does not exist")
        protocol = experiment.deep_merge(protocol, yaml.safe_load(config_file.read_text()) or {})
    students = [int(k) for k in protocol["distill"]["students"]]
    if students and max(students) > int(protocol["joint_lm_layers"]):
        raise UserError(
            f"students of {max(students)} layers need a teacher of at least as many; joint_lm_layers is "
            f"{protocol['joint_lm_layers']}"
        )
    if students and protocol["distill"]["teacher_fusion"] not in ["best", *protocol["fusions"]]:
        raise UserError(f"distill.teacher_fusion must be `best` or one of fusions {protocol['fusions']}")
    return protocol


def command(argv: Sequence[str]) -> dict[str, Any]:
    """Run an `nlpctr` command in this process (Beam, Feast and torch load once)."""
    job, rest = resolve(list(argv))
    return job(rest)


# A student's conversion rate when the teacher feature gains nothing significant over E0.
NOT_DISTILLED = {
    "conversion_auc": None,
    "conversion_auc_ci": None,
    "conversion_rig": None,
    "conversion_rig_ci": None,
    "conversion_note": distill.NOTHING_TO_DISTIL,
}

# ------------------------------------------------------------------------------- features


@dataclass
class NlpFeature:
    """One NLP feature on every row of the base frame (rows in impression_id order).

    `measured` is what the redundancy probes look at (a score, or a vector); `cascade` and
    `score` are what joins E0 when the feature's increment is trained.
    """

    name: str
    kind: str  # frozen | cascade_finetuned | joint | student
    measured: np.ndarray
    cascade: np.ndarray | None = None
    score: np.ndarray | None = None


def pair_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """The (query_text_id, ad_text_id) key LM features are stored under; no query -> ''."""
    query = frame["query_text_id"] if "query_text_id" in frame else pd.Series("", index=frame.index)
    return pd.DataFrame({"query_text_id": query.fillna("").astype(str), "ad_text_id": frame["ad_text_id"]})


def join_pair_table(frame: pd.DataFrame, table: pd.DataFrame, column: str) -> np.ndarray:
    """`table[column]` (keyed by text pair) for every row of `frame`, in order; a missing key is an error."""
    keys = pair_keys(frame)
    if "query_text_id" not in table:
        table = table.assign(query_text_id="")
    on = pair_key_columns()
    joined = keys.merge(table[[*on, column]], on=on, how="left", validate="many_to_one")
    if joined[column].isna().any():
        raise RuntimeError(f"{column}: {int(joined[column].isna().sum())} rows have no LM feature")
    values = joined[column].to_numpy()
    return np.stack(values).astype(np.float32) if values.dtype == object else values.astype(np.float32)


def lm_feature_table(data_dir: Path, run: str, epoch_folder: str) -> pd.DataFrame:
    folder = lm_features_dir(data_dir, lm_feature_slug(run)) / epoch_folder
    return pd.read_parquet(folder)


def frozen_vectors(frame: pd.DataFrame) -> np.ndarray:
    """E1's text input: the ad's and (when there is one) the query's frozen vectors, side by side."""
    columns = sorted(c for c in frame.columns if c.endswith("__embedding"))
    parts = []
    for column in columns:
        present = frame[column].dropna()
        dim = len(present.iloc[0])
        parts.append(
            np.stack(
                [np.zeros(dim, np.float32) if v is None else np.asarray(v, np.float32) for v in frame[column]]
            )
        )
    return np.concatenate(parts, axis=1)


# ------------------------------------------------------------------------------- the protocol


class Experiment:
    """One dataset through the protocol; each step records its wall time in `timings`."""

    def __init__(self, args: argparse.Namespace, protocol: dict[str, Any], out: Path) -> None:
        self.args, self.protocol, self.out = args, protocol, out
        self.data_dir = out / "data"
        self.runs_dir = out / "runs"
        self.seed = int(args.seed)
        self.progress = not args.no_progress
        self.timings: dict[str, float] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.train_config_file = out / "train_config.yaml"
        self.feast_agreement: float | None = None  # E2's chosen checkpoint: Feast vs in-memory
        # Per NLP feature: test predictions of E0 + it, and its validation ΔAUC over E0 (what
        # selects a teacher or a checkpoint, so the test split only judges).
        self.increments: dict[str, np.ndarray] = {}
        self.valid_gain: dict[str, float] = {}
        self.code_version = train.code_version()  # at the start: the tree may change during a long run

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[experiment] {name} ...", flush=True)
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 2)
        print(f"[experiment] {name}: {self.timings[name]:.1f} s", flush=True)

    # -------------------------------------------------------------------- data and features

    def prepare(self, dataset: str) -> None:
        with self.stage("prepare"):
            command(
                [
                    "data",
                    "prepare",
                    "--dataset",
                    dataset,
                    "--out",
                    str(self.data_dir),
                    "--seed",
                    str(self.seed),
                ]
            )
        with self.stage("ctr_stats"):
            command(["ctr-stats", "--data", str(self.data_dir)])
        with self.stage("embed"):
            command(["embed", "--data", str(self.data_dir), "--layers", str(self.protocol["embed_layers"])])
        with self.stage("feast_apply_materialize"):
            command(["features", "apply", "--data", str(self.data_dir)])
            command(["features", "materialize", "--data", str(self.data_dir)])
        self.manifest = read_manifest(self.data_dir)

    # -------------------------------------------------------------------- E0-E3

    def train(self, run: str, mode: str, fusion: str | None = None) -> dict[str, Any]:
        argv = ["--mode", mode, "--data", str(self.data_dir), "--run", run, "--runs-dir", str(self.runs_dir)]
        argv += ["--config", str(self.train_config_file), "--seed", str(self.seed)]
        if fusion:
            argv += ["--fusion", fusion]
        if mode == "cascade-finetuned":
            argv += ["--layers", str(self.protocol["lm_layers"])]
        if mode == "joint":
            argv += ["--layers", str(self.protocol["joint_lm_layers"])]
        if mode == "joint" and self.protocol["joint_init_from_baseline"]:
            argv += ["--init-from", BASELINE_RUN]
        if not self.progress:
            argv.append("--no-progress")
        with self.stage(f"train_{run}"):
            results = train.run(argv)
        print(results["summary"], flush=True)
        return results

    def train_runs(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.train_config_file.write_text(yaml.safe_dump(self.protocol["train_config"], sort_keys=True))
        self.trained = {BASELINE_RUN: self.train(BASELINE_RUN, "baseline")}
        self.trained["cascade_frozen"] = self.train("cascade_frozen", "cascade-frozen")
        self.trained["cascade_finetuned"] = self.train("cascade_finetuned", "cascade-finetuned")
        for fusion in self.protocol["fusions"]:
            self.trained[f"joint_{fusion}"] = self.train(f"joint_{fusion}", "joint", fusion)
        self.load_test_set()
        for name, results in self.trained.items():
            self.runs[name] = self.run_entry(name, results)

    def load_test_set(self) -> None:
        """The frame every analysis shares: cascade-frozen's training frame (a superset of E0's)."""
        with self.stage("training_frame"):
            self.frame = feature_store.training_frame(self.data_dir, CASCADE_FROZEN)
        self.frame = self.frame.sort_values("impression_id", kind="stable").reset_index(drop=True)
        self.e0 = experiment.TrainedRun.load(self.runs_dir / BASELINE_RUN)
        self.data = self.e0.pre.tensorize(self.frame)
        self.test_rows = self.data.rows("test")
        self.train_rows = self.data.rows("train")
        self.test_labels = labels_of(self.data, self.test_rows)
        self.train_ctr = float(self.e0.spec["train_ctr"])
        self.evaluation = self.e0.spec["config"]["evaluation"]
        self.e0_p = self.saved_predictions(BASELINE_RUN)
        self.valid_rows = self.data.rows("valid")
        self.valid_labels = labels_of(self.data, self.valid_rows)
        self.e0_valid_auc = metrics.auc(
            self.valid_labels, predict(self.e0.model, self.data, self.valid_rows, None)
        )
        rows = (self.train_rows, self.test_rows)  # E0's side of every redundancy probe, once
        self.e0_inputs = [redundancy.e0_design_matrix(self.data, r) for r in rows]
        self.e0_repr = [redundancy.e0_representation(self.e0.model, self.data, r) for r in rows]
        self.ceiling = self.text_ceiling()

    def text_ceiling(self) -> ceilings.Ceiling:
        """The test split's ceilings (`models/ceilings.py`): the simulator's oracles when its truth
        file sits beside the source, else the split-half ceiling; shares pair with E0's CIs."""
        with self.stage("ceilings"):
            frame = self.frame.iloc[self.test_rows.numpy()]
            return ceilings.for_split(
                self.manifest, frame, self.test_labels, self.e0_p, self.train_ctr, self.evaluation, self.seed
            )

    def saved_predictions(self, run: str) -> np.ndarray:
        saved = pd.read_parquet(self.runs_dir / run / experiment.PREDICTIONS_FILE).set_index("impression_id")
        p = saved["p"].reindex(self.data.impression_id[self.test_rows.numpy()]).to_numpy()
        if np.isnan(p).any():
            raise RuntimeError(f"run {run} did not predict every test row")
        return p

    def report_of(self, p: np.ndarray) -> dict[str, Any]:
        """Test metrics of predictions `p` and their paired delta over E0's."""
        entry = experiment.metric_report(self.test_labels, p, self.train_ctr, self.evaluation)
        delta = experiment.paired_delta(self.test_labels, p, self.e0_p, self.train_ctr, self.evaluation)
        entry["delta_auc_vs_baseline"] = delta["delta_auc"]
        entry["delta_rig_vs_baseline"] = delta["delta_rig"]
        entry.update({k: v for k, v in delta.items() if k not in ("delta_auc", "delta_rig")})
        entry["share_of_text_gain"] = self.ceiling.share(p)
        return entry

    def run_entry(self, name: str, results: dict[str, Any]) -> dict[str, Any]:
        if name == BASELINE_RUN:
            entry = experiment.metric_report(self.test_labels, self.e0_p, self.train_ctr, self.evaluation)
            entry.update(dict.fromkeys(["delta_auc_vs_baseline", "delta_auc_ci", "delta_rig_vs_baseline"]))
            entry.update(dict.fromkeys(["delta_rig_ci", "delta_gauc", "delta_gauc_ci", "significant"]))
        else:
            entry = self.report_of(self.saved_predictions(name))
        entry.update(
            mode=results["mode"],
            fusion=results["fusion"],
            layers=results["layers"],
            epochs=results["epochs"],
            best_epoch=results["best_epoch"],
            wall_seconds=results["wall_seconds"],
            train_rows_per_s=results["train_rows_per_s"],
            best_valid_logloss=results.get("best_valid_logloss"),
        )
        if results.get("stages"):  # the joint recipe: per stage, and its validation curve
            entry["stages"] = results["stages"]
            entry["valid_curve"] = [
                {k: h[k] for k in ("stage", "step", "valid_logloss", "valid_auc")} for h in results["history"]
            ]
        return entry

    # -------------------------------------------------------------------- features and increments

    def feature_of_lm(self, run: str, epoch_folder: str, kind: str, name: str) -> NlpFeature:
        table = lm_feature_table(self.data_dir, run, epoch_folder)
        columns = [c for c in ("lm_score", "supplementary", "lm_embedding") if c in table]
        values = {c: join_pair_table(self.frame, table, c) for c in columns}
        if "lm_embedding" in values and "lm_score" in values:  # E2: the score is its output
            return NlpFeature(name, kind, values["lm_score"], values["lm_embedding"], values["lm_score"])
        if "lm_score" in values:
            return NlpFeature(name, kind, values["lm_score"], score=values["lm_score"])
        return NlpFeature(name, kind, values["supplementary"], cascade=values["supplementary"])

    def fit_increment(self, feature: NlpFeature) -> np.ndarray:
        """Test predictions of E0 + the feature, trained like E0 (same config, seed and rows)."""
        frame = self.frame.copy()
        cascade, scores = [], []
        if feature.cascade is not None:
            frame["nlp_feature__vector"] = list(feature.cascade)
            cascade.append("nlp_feature__vector")
        if feature.score is not None:
            frame["nlp_feature__score"] = feature.score
            scores.append("nlp_feature__score")
        columns = FeatureColumns.for_manifest(self.manifest, cascade=cascade, scores=scores)
        config = experiment.load_config("baseline", self.train_config_file, {"loop": {"seed": self.seed}})
        checkpoints = self.runs_dir / "_increments" / feature.name
        shutil.rmtree(checkpoints, ignore_errors=True)  # never resume another feature's weights
        _, data, model, _, _ = train.fit_ctr(
            frame, columns, self.manifest, config, self.e0.pre.fill_ctr, checkpoints, None, False
        )
        valid = data.rows("valid")
        assert torch.equal(valid, self.valid_rows)  # the same frame, so the same rows
        self.valid_gain[feature.name] = (
            metrics.auc(self.valid_labels, predict(model, data, valid, None)) - self.e0_valid_auc
        )
        return predict(model, data, data.rows("test"), None)

    def measure(self, feature: NlpFeature, increment: np.ndarray) -> dict[str, Any]:
        """Standalone AUC, incremental gain (E0 + feature vs E0), explained fraction and CKA."""
        delta = experiment.paired_delta(
            self.test_labels, increment, self.e0_p, self.train_ctr, self.evaluation
        )
        measured = redundancy.measure_feature(
            feature.kind,
            feature.measured[self.train_rows.numpy()],
            feature.measured[self.test_rows.numpy()],
            labels_of(self.data, self.train_rows),
            self.test_labels,
            *self.e0_inputs,
            *self.e0_repr,
            delta,
            max_rows=int(self.protocol["redundancy"]["max_rows"]),
            max_components=int(self.protocol["redundancy"]["max_components"]),
            seed=self.seed,
        ).to_dict()
        measured["significant"] = delta["significant"]
        measured["share_of_text_gain"] = self.ceiling.share(increment)
        measured["valid_delta_auc"] = self.valid_gain.get(feature.name)
        self.increments[feature.name] = increment
        measured["dim"] = int(feature.measured.shape[1]) if feature.measured.ndim == 2 else 1
        return measured

    def redundancy(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every NLP feature's measures, and E2's standalone-vs-gain curve over its checkpoints."""
        measures: dict[str, Any] = {}
        with self.stage("redundancy_frozen"):
            frozen = NlpFeature("frozen", "frozen", frozen_vectors(self.frame))
            measures["frozen"] = self.measure(frozen, self.saved_predictions("cascade_frozen"))
        e2 = self.trained["cascade_finetuned"]["lm"]
        points = []
        with self.stage("redundancy_cascade_finetuned"):
            for folder in sorted(e2["features"], key=lambda f: int(f.split("-")[1])):
                name = f"cascade_finetuned@{folder}"
                feature = self.feature_of_lm("cascade_finetuned", folder, "cascade_finetuned", name)
                increment = self.fit_increment(feature)
                if folder == e2["chosen"]:
                    through_feast = self.saved_predictions("cascade_finetuned")
                    self.feast_agreement = float(np.max(np.abs(increment - through_feast)))
                measures[name] = self.measure(feature, increment)
                points.append(
                    {
                        "checkpoint": folder,
                        "standalone_auc": measures[name]["standalone_auc"],
                        "delta_auc": measures[name]["delta_auc"],
                        "delta_rig": measures[name]["delta_rig"],
                        "chosen": folder == e2["chosen"],
                        "valid_auc_standalone": next(
                            h["valid_auc"] for h in e2["history"] if f"epoch-{int(h['epoch'])}" == folder
                        ),
                    }
                )
        for fusion in self.protocol["fusions"]:
            run = f"joint_{fusion}"
            with self.stage(f"redundancy_{run}"):
                folder = f"epoch-{self.trained[run]['best_epoch']}"
                feature = self.feature_of_lm(run, folder, "joint", run)
                measures[run] = self.measure(feature, self.fit_increment(feature))
        return measures, redundancy.e2_curve(points)

    # -------------------------------------------------------------------- E4

    def teacher_run(self) -> str:
        """E4's teacher: the joint run named by `distill.teacher_fusion`, or with `best`, the one
        whose LM feature adds most to E0 on validation (the test split only judges)."""
        fusion = self.protocol["distill"]["teacher_fusion"]
        if fusion in self.protocol["fusions"]:  # (checked when E4 runs; else `best`)
            return f"joint_{fusion}"
        candidates = [f"joint_{f}" for f in self.protocol["fusions"]]
        return max(candidates, key=lambda run: self.valid_gain[run])  # ties: the first listed

    def distillation(self, measures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """SuKD, No-KD and feature-KD students of the teacher LM (`teacher_run`).

        Every student's output is measured as an NLP feature added to E0 (into `measures`), which
        is how the paper deploys it; its conversion rate is that feature's gain over the teacher
        feature's, with a paired CI, or "nothing to distil" when the teacher feature's own gain
        over E0 is not significantly positive.
        """
        settings = self.protocol["distill"]
        teacher_run = self.teacher_run()
        teacher = experiment.TrainedRun.load(self.runs_dir / teacher_run)
        assert teacher.lm is not None
        data = teacher.pre.tensorize(self.frame)
        test = data.rows("test")
        joint_loop = experiment.loop_config({"loop": {**settings["loop"], "seed": self.seed}})
        text_loop = experiment.loop_config({"loop": {**settings["feature_kd"], "seed": self.seed}})
        targets = distill.supplementary_outputs(teacher.model, teacher.lm, data)
        teacher_vectors = distill.pooled_vectors(teacher.lm, data)
        sample = [pair_text(q, a) for q, a in data.texts[: int(settings["throughput_texts"])]]
        rows_of_text = data.text_index.numpy()
        teacher_feature = measures[teacher_run]
        distillable = claims.verdict(teacher_feature["delta_auc_ci"]) == claims.HOLDS
        out: dict[str, Any] = {}
        speeds: dict[int, tuple[float, float]] = {}
        for layers in (int(k) for k in settings["students"]):
            for method in ("sukd", "nokd", "featurekd"):
                key = f"{method}_L{layers}"
                folder = self.runs_dir / "_students" / key
                shutil.rmtree(folder, ignore_errors=True)  # a student never resumes another's weights
                with self.stage(f"distill_{key}"):
                    if method == "featurekd":
                        student = distill.fit_feature_kd(
                            teacher.lm, data, layers, text_loop, folder, teacher_vectors, self.progress
                        )
                        vectors = distill.pooled_vectors(student.lm, data).numpy()[rows_of_text]
                        feature = NlpFeature(key, "student", vectors, cascade=vectors)
                        p = increment = self.fit_increment(feature)  # a cascade feature: E0 + it
                        lm = student.lm
                    else:
                        weight = float(settings["weight"]) if method == "sukd" else 0.0
                        joint = distill.fit_joint_student(
                            teacher.model,
                            teacher.lm,
                            data,
                            layers,
                            weight,
                            joint_loop,
                            folder,
                            targets,
                            self.progress,
                        )
                        p = predict(joint.model, data, test, TextBatcher.for_data(joint.lm, data))
                        output = distill.supplementary_outputs(joint.model, joint.lm, data).numpy()[
                            rows_of_text
                        ]
                        feature = (
                            NlpFeature(key, "student", output, score=output)
                            if output.ndim == 1
                            else NlpFeature(key, "student", output, cascade=output)
                        )
                        increment = self.fit_increment(feature)
                        lm = joint.lm
                    measures[key] = self.measure(feature, increment)
                    if layers not in speeds:  # timed side by side, on the same texts
                        speeds[layers] = (
                            distill.inference_rows_per_s(lm, sample),
                            distill.inference_rows_per_s(teacher.lm, sample),
                        )
                    out[key] = self.student_entry(method, layers, p, measures[key])
                    out[key].update(self.conversion(key, teacher_run) if distillable else NOT_DISTILLED)
                    out[key]["rows_per_s"], out[key]["teacher_rows_per_s"] = speeds[layers]
        teacher_entry = self.runs[teacher_run]
        teacher_info = {
            "run": teacher_run,
            "fusion": teacher_run.removeprefix("joint_"),
            "selected_by": "validation ΔAUC of its LM feature over E0"
            if settings["teacher_fusion"] == "best"
            else "distill.teacher_fusion",
            "valid_delta_auc": {
                f"joint_{f}": self.valid_gain[f"joint_{f}"] for f in self.protocol["fusions"]
            },
            "layers": int(self.protocol["joint_lm_layers"]),
            "auc": teacher_entry["auc"],
            "rig": teacher_entry["rig"],
            "gauc": teacher_entry["gauc"],
            "feature_delta_auc": teacher_feature["delta_auc"],
            "feature_delta_auc_ci": teacher_feature["delta_auc_ci"],
            "feature_delta_rig": teacher_feature["delta_rig"],
            "nothing_to_distil": not distillable,
        }
        return out, teacher_info

    def conversion(self, student: str, teacher: str) -> dict[str, Any]:
        """The student feature's gain over E0 as a share of the teacher feature's, paired CIs."""
        rounds, seed = int(self.evaluation["bootstrap_rounds"]), int(self.evaluation["bootstrap_seed"])
        rates = distill.conversion(
            self.test_labels,
            self.increments[student],
            self.increments[teacher],
            self.e0_p,
            self.train_ctr,
            rounds,
            seed,
        )
        return {
            "conversion_auc": rates["auc"]["estimate"],
            "conversion_auc_ci": rates["auc"]["ci"],
            "conversion_rig": rates["rig"]["estimate"],
            "conversion_rig_ci": rates["rig"]["ci"],
        }

    def student_entry(
        self, method: str, layers: int, p: np.ndarray, feature: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The student end to end (`p`; for feature-KD that is E0 + its feature) and as a feature."""
        entry = self.report_of(p)
        return {
            "method": method,
            "layers": layers,
            "auc": entry["auc"],
            "auc_ci": entry["auc_ci"],
            "rig": entry["rig"],
            "gauc": entry["gauc"],
            "logloss": entry["logloss"],
            "delta_auc": entry["delta_auc_vs_baseline"],
            "delta_auc_ci": entry["delta_auc_ci"],
            "delta_rig": entry["delta_rig_vs_baseline"],
            "delta_rig_ci": entry["delta_rig_ci"],
            "feature_delta_auc": feature["delta_auc"],
            "feature_delta_auc_ci": feature["delta_auc_ci"],
            "feature_delta_rig": feature["delta_rig"],
            "feature_delta_rig_ci": feature["delta_rig_ci"],
        }

    # -------------------------------------------------------------------- the paper's claims

    def paired(self, feature: str, other: str) -> dict[str, Any]:
        """Paired test delta between E0 + `feature` and E0 + `other` (group bootstrap)."""
        return experiment.paired_delta(
            self.test_labels,
            self.increments[feature],
            self.increments[other],
            self.train_ctr,
            self.evaluation,
        )

    def claims(self, teacher: str) -> list[dict[str, Any]]:
        """The paper's three claims (`models/claims.py`), each judged as cascaded NLP features."""
        e2 = self.trained["cascade_finetuned"]["lm"]
        peak = f"cascade_finetuned@{e2['chosen']}"  # E2 stops at peak standalone valid AUC
        checkpoints = [name for name in self.increments if name.startswith("cascade_finetuned@")]
        best = max(checkpoints, key=lambda name: self.valid_gain[name])  # ties: the earliest
        out = [
            claims.from_delta(
                claims.PEAK_AUC_NOT_BEST,
                "E2's checkpoint with the best validation feature gain adds more to E0 than its "
                "peak-standalone-AUC checkpoint",
                self.paired(best, peak),
                detail={
                    "best_feature_checkpoint": best,
                    "peak_auc_checkpoint": peak,
                    "same_checkpoint": best == peak,
                    "valid_delta_auc": {name: self.valid_gain[name] for name in checkpoints},
                },
            ),
            claims.from_delta(
                claims.JOINT_BEATS_FINETUNED,
                "the joint LM's feature adds more to E0 than the E2 (peak-AUC) feature, both fed the "
                "cascaded way",
                self.paired(teacher, peak),
                detail={"joint_feature": teacher, "finetuned_feature": peak},
            ),
        ]
        for layers in (int(k) for k in self.protocol["distill"]["students"]):
            sukd, featurekd = f"sukd_L{layers}", f"featurekd_L{layers}"
            if sukd in self.increments and featurekd in self.increments:
                out.append(
                    claims.from_delta(
                        claims.SUKD_BEATS_FEATUREKD,
                        f"the {layers}-layer SuKD student's feature adds more to E0 than the "
                        f"{layers}-layer feature-KD student's",
                        self.paired(sukd, featurekd),
                        detail={"layers": layers, "sukd": sukd, "featurekd": featurekd},
                    )
                )
        return [claim.to_dict() for claim in out]

    def results(self, dataset: str, started: float, **sections: Any) -> dict[str, Any]:
        return {
            "dataset": self.manifest["dataset"],
            "source": dataset,
            "seed": self.seed,
            "split": self.manifest["split"]["mode"],
            "quick": bool(self.args.quick),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "timings": self.timings,
            "runs": self.runs,
            "ceilings": self.ceiling.summary(),
            **sections,
            "protocol": self.protocol,
            "provenance": {
                "dataset": self.manifest["dataset"],
                "spec_hash": self.manifest.get("spec_hash"),
                "split_mode": self.manifest["split"]["mode"],
                "split_seed": self.manifest["split"]["seed"],
                "frozen_encoder": train.frozen_encoder_version(self.data_dir, self.frame),
                "lm_encoder": self.trained[f"joint_{self.protocol['fusions'][0]}"]["provenance"][
                    "encoder_version"
                ],
                "code_version": self.code_version,
                "torch": torch.__version__,
                # Relative to the results folder: a result never names a path outside its tree.
                "data_dir": self.data_dir.relative_to(self.out).as_posix(),
                "runs_dir": self.runs_dir.relative_to(self.out).as_posix(),
                "e2_feast_vs_in_memory_max_abs_diff": self.feast_agreement,
            },
        }


def run_protocol(
    args: argparse.Namespace, protocol: dict[str, Any], dataset: str, out: Path
) -> dict[str, Any]:
    """One dataset: prepare, E0-E3, redundancy, and E4 when the protocol asks for it."""
    started = time.perf_counter()
    out = claim_output_dir(out, JOB, create=True)
    exp = Experiment(args, protocol, out)
    exp.prepare(dataset)
    exp.train_runs()
    measures, curve = exp.redundancy()
    sections: dict[str, Any] = {"redundancy": measures, "e2_curve": curve}
    if protocol["distill"]["students"]:
        sections["distillation"], sections["teacher"] = exp.distillation(measures)
    sections["claims"] = exp.claims(exp.teacher_run())
    results = exp.results(dataset, started, **sections)
    write_results(results, out)
    return results


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json (written to a temporary name, then renamed), report.md and the plots."""
    staged = out / ".results.json.tmp"
    staged.write_text(json.dumps(results, indent=2, sort_keys=True, default=float) + "\n")
    staged.replace(out / "results.json")
    return report.write_report(results, out)


# ------------------------------------------------------------------------------- the simulator sweep


def sweep_impressions_per_row(args: argparse.Namespace, settings: Mapping[str, Any]) -> int:
    """Impressions per simulated row: --impressions-per-row, else the protocol's; 0 = binary rows."""
    value = args.impressions_per_row
    value = int(settings.get("impressions_per_row") or 0) if value is None else int(value)
    if value < 0:
        raise UserError(f"--impressions-per-row must be >= 0, got {value}")
    return value


def finished_rho(out: Path, protocol: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """The results of a rho folder that a run with this protocol and seed finished, else None.
    Only without --rows / --impressions-per-row: the protocol then fixes the simulated log."""
    done = out / "results.json"
    if args.rows or args.impressions_per_row is not None or not done.is_file():
        return None
    previous = json.loads(done.read_text())
    same = previous.get("protocol") == json.loads(json.dumps(protocol, default=float))
    return previous if same and previous.get("seed") == int(args.seed) else None


def run_sweep(args: argparse.Namespace, protocol: dict[str, Any]) -> dict[str, Any]:
    """The protocol (without E4) on a simulated log per rho, and the trends against rho."""
    started = time.perf_counter()
    settings = protocol["simulator"]
    rhos = [float(r) for r in args.rho.split(",")] if args.rho else [float(r) for r in settings["rho"]]
    rows = int(args.rows or settings["rows"])
    per_row = sweep_impressions_per_row(args, settings)
    if not settings.get("distill", False):
        protocol = experiment.deep_merge(protocol, {"distill": {"students": []}})
    per_rho: dict[float, dict[str, Any]] = {}
    for rho in rhos:
        out = claim_output_dir(args.out / f"rho-{rho:g}", JOB, create=True)
        finished = finished_rho(out, protocol, args)
        if finished is not None:  # a rerun of an interrupted sweep keeps the values it finished
            print(f"[experiment] rho {rho:g}: finished before with this protocol and seed; kept", flush=True)
            per_rho[rho] = finished
            continue
        log = out / "log" / "log.parquet"
        simulate = ["data", "simulate", "--rows", str(rows), "--rho", str(rho), "--seed", str(args.seed)]
        simulate += ["--text-strength", str(settings["text_strength"]), "--out", str(log)]
        simulate += ["--impressions-per-row", str(per_row)] if per_row else []
        command(simulate + (["--no-progress"] if args.no_progress else []))
        per_rho[rho] = run_protocol(args, protocol, str(log.with_name("log.spec.yaml")), out)
    kept = {rho: sweep.entry(results) for rho, results in per_rho.items()}
    results = {
        "dataset": SIMULATED,
        "seed": int(args.seed),
        "quick": bool(args.quick),
        "rows": rows,
        "impressions_per_row": per_row or None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "simulator": {
            "rho": rhos,
            "per_rho": {f"{r:g}": kept[r] for r in rhos},
            "trends": sweep.trends(kept),
            "predictions": sweep.predictions(kept),
        },
        "protocol": protocol,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(results, args.out)
    return results


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """`nlpctr experiment`; returns the results with a one-line `summary`."""
    args = parse_args(argv)
    args.out = args.out.resolve()
    protocol = load_protocol(args.quick, args.config, simulated=args.dataset == SIMULATED)
    if args.dataset != SIMULATED and (args.rho or args.rows or args.impressions_per_row is not None):
        raise UserError(f"--rho, --rows and --impressions-per-row go with --dataset {SIMULATED}")
    # Before any work: --out is new, empty or an earlier experiment's folder (then marked as
    # this job's), and holds neither the spec nor the source log.
    inputs = []
    if args.dataset != SIMULATED:
        spec = load_spec(args.dataset)
        inputs = [spec.spec_path, spec.source.path]
    claim_output_dir(args.out, JOB, inputs=inputs, create=True)
    if args.dataset == SIMULATED:
        results = run_sweep(args, protocol)
        trends = results["simulator"]["trends"]
        shown = ", ".join(f"{k} {v['spearman']:+.2f}" for k, v in trends.items() if k.endswith(":delta_auc"))
        results["summary"] = (
            f"experiment simulated: {len(results['simulator']['rho'])} rho values x {results['rows']} rows; "
            f"Spearman vs rho of ΔAUC: {shown}; {results['wall_seconds']:.0f} s -> {args.out}/results.json"
        )
        return results
    results = run_protocol(args, protocol, args.dataset, args.out)
    runs = results["runs"]
    best = max((k for k in runs if k != BASELINE_RUN), key=lambda k: runs[k]["auc"])
    verdicts = ", ".join(
        f"{c['id']}{'@L' + str(c['detail']['layers']) if 'layers' in c['detail'] else ''} {c['verdict']}"
        for c in results["claims"]
    )
    results["summary"] = (
        f"experiment {results['dataset']}: E0 AUC {runs[BASELINE_RUN]['auc']:.4f}; best {best} "
        f"{runs[best]['auc']:.4f} (ΔAUC {runs[best]['delta_auc_vs_baseline']:+.4f}); "
        f"{len(results['redundancy'])} features measured, {len(results.get('distillation', {}))} students; "
        f"claims: {verdicts}; {results['wall_seconds']:.0f} s -> {args.out}/report.md"
    )
    return results
