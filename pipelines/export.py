"""Export a trained LM as a transformers folder with its click head and a model card.

    nlpctr export --run RUN --out DIR [--runs-dir runs] [--onnx]

RUN is a finished train run with an LM (E2, E3) or an experiment's student
(`RUNS/_students/<key>`). DIR is checked by reading it back (`FolderScorer`) before it is
published; it must be new, empty or an earlier export. The folder's files: docs/USAGE.md,
"Exporting an LM"; the check: docs/DESIGN.md, "Modules in detail", export.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

import nlpctr
from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.features.names import lm_feature_slug
from nlpctr.layout import EXPERIMENT_RESULTS, IMPRESSIONS, LmFeatureMeta, Manifest, RunLayout, lm_features_dir
from nlpctr.models.export import (
    EXPORT_FILE,
    ONNX_FILE,
    ExportedLM,
    FolderScorer,
    export_onnx,
    lm_of_run,
    lm_of_student,
    onnx_available,
    save_folder,
)
from nlpctr.models.lm_features import pairs_of, text_pairs
from nlpctr.models.runs import STUDENTS
from nlpctr.pipelines.export_card import model_card
from nlpctr.pipelines.outputs import staged_output
from nlpctr.pipelines.ownership import claim_output_dir, is_experiment

JOB = "export"
CHECK_PAIRS = 256  # text pairs of the run's data the exported folder is checked on
FALLBACK_PAIRS = [(None, "A headline nobody has read"), ("cheap flights", "Fly to Lisbon for less")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run in --runs-dir, or an experiment's student key")
    parser.add_argument(
        "--out", required=True, type=Path, help="the folder to write (new, or an earlier export)"
    )
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--onnx", action="store_true", help="also model.onnx (pip install 'nlpctr[onnx]')")
    return parser.parse_args(argv)


def find(runs_dir: Path, name: str) -> ExportedLM:
    """The run folder or student `name` names, rebuilt; a one-line error naming what exists."""
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--run must be a run's folder name or a student key, got {name!r}")
    if not runs_dir.is_dir():
        raise UserError(f"--runs-dir {runs_dir} is not a folder of runs")
    if RunLayout(runs_dir / name).run.is_file():
        return lm_of_run(runs_dir / name)
    if (runs_dir / STUDENTS / name).is_dir():
        return lm_of_student(runs_dir / STUDENTS / name, runs_dir)
    if (runs_dir / name).is_dir():
        raise UserError(
            f"run {name} has not finished (no {RunLayout.RUN} in {runs_dir / name}); train it again"
        )
    runs = sorted(p.name for p in runs_dir.iterdir() if RunLayout(p).run.is_file())
    students = sorted(p.name for p in (runs_dir / STUDENTS).glob("*") if p.is_dir())
    raise UserError(
        f"--run {name} is neither a run in {runs_dir} ({', '.join(runs) or 'none'}) nor a student "
        f"({', '.join(students) or 'none'})"
    )


def _json(path: Path) -> JsonObject | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def check_pairs(data_dir: Path | None) -> pd.DataFrame:
    """Up to CHECK_PAIRS (query, ad) pairs of the run's data, spread over it, with their ids."""
    columns = ["query_text_id", "ad_text_id", "query_text", "ad_text", "event_timestamp"]
    try:
        dataset = ds.dataset(data_dir / IMPRESSIONS, format="parquet") if data_dir else None
        frame = dataset.to_table(columns=[c for c in columns if c in dataset.schema.names]).to_pandas()
    except (OSError, ValueError, AttributeError):
        frame = None
    if frame is None or frame.empty:  # the data moved: a few texts still check the folder
        return pd.DataFrame(
            {"query_text": [q for q, _ in FALLBACK_PAIRS], "ad_text": [a for _, a in FALLBACK_PAIRS]}
        )
    pairs = text_pairs(frame)
    return pairs.iloc[:: max(1, len(pairs) // CHECK_PAIRS)].head(CHECK_PAIRS).reset_index(drop=True)


def written_feature(exported: ExportedLM, data_dir: Path | None, pairs: pd.DataFrame) -> np.ndarray | None:
    """What the run wrote as its LM feature for `pairs` (E2's lm_score, a joint run's lm_score or
    supplementary vector), or None (a student, or the data is gone)."""
    if exported.kind == "student" or data_dir is None or "ad_text_id" not in pairs:
        return None
    folder = lm_features_dir(data_dir, lm_feature_slug(exported.name))
    if not LmFeatureMeta.exists(folder):
        return None
    meta = LmFeatureMeta.read(folder)
    column = "lm_score" if exported.output == "logit" else "supplementary"
    table = ds.dataset(folder / meta.chosen, format="parquet").to_table().to_pandas()
    keys = list(meta.keys)
    joined = pairs[keys].merge(table[[*keys, column]], on=keys, how="left")
    if joined[column].isna().any():
        return None
    return np.stack(joined[column].to_numpy()).astype(np.float32)


def checks(
    exported: ExportedLM, folder: Path, pairs: pd.DataFrame, data_dir: Path | None
) -> list[JsonObject]:
    """The exported folder, read back with transformers, against the run's model and its feature."""
    texts = pairs_of(pairs)
    _, reference = exported.outputs(texts)
    _, got = FolderScorer(folder).outputs(texts)
    out = [
        {
            "what": "the folder read back with transformers vs the run's model",
            "pairs": len(texts),
            "max_abs_diff": float(np.max(np.abs(got - reference))),
        }
    ]
    written = written_feature(exported, data_dir, pairs)
    if written is not None:
        out.append(
            {
                "what": "the folder read back with transformers vs the LM feature the run wrote",
                "pairs": len(texts),
                "max_abs_diff": float(np.max(np.abs(got - written))),
            }
        )
    return out


def run(argv: list[str] | None = None) -> JsonObject:
    """`nlpctr export`; returns what it wrote with a one-line `summary`."""
    args = parse_args(argv)
    if args.onnx:
        onnx_available()
    runs_dir = args.runs_dir.resolve()
    inputs = [runs_dir / args.run, runs_dir / STUDENTS / args.run]
    out = claim_output_dir(args.out, JOB, inputs=inputs)  # before any work
    exported = find(runs_dir, args.run)
    results = _json(RunLayout(exported.source).results) or {}
    recorded = results.get("provenance", {}).get("data_dir")
    data_dir = Path(recorded) if recorded else None
    pairs = check_pairs(data_dir)
    experiment = _json(runs_dir.parent / EXPERIMENT_RESULTS) if is_experiment(runs_dir.parent) else None
    with staged_output(out, JOB, inputs=inputs) as staging:
        head = save_folder(exported, staging)
        record: JsonObject = {
            "run": exported.name,
            "kind": exported.kind,
            "source": str(exported.source),
            "student": exported.student.__dict__ if exported.student else None,
            "encoder_version": exported.lm.config.version,
            "encoder": exported.lm.config.fields(),
            "pair_reading": exported.lm.config.pair_reading,
            "output": head["output"],
            "nlpctr_version": nlpctr.__version__,
            "checks": checks(exported, staging, pairs, data_dir),
            "onnx": None,
        }
        if args.onnx:
            record["onnx"] = export_onnx(
                staging, staging / ONNX_FILE, [t for q, a in pairs_of(pairs) for t in (q, a) if t][:64]
            )
        feature = _feature_name(exported, results)
        card = model_card(
            exported,
            head,
            record,
            results,
            Manifest.find(data_dir) if data_dir else None,
            experiment,
            feature,
        )
        (staging / "README.md").write_text(card)
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    worst = max(c["max_abs_diff"] for c in record["checks"])
    onnx = f", {ONNX_FILE} (max |Δ| {record['onnx']['max_abs_diff']:.1e})" if record["onnx"] else ""
    summary = (
        f"exported {exported.name} ({exported.kind}, {exported.lm.config.layers} layers, output "
        f"{head['output']}): reloaded with transformers, max |Δ| {worst:.1e} on {len(pairs)} pairs{onnx} "
        f"-> {out}"
    )
    return {**record, "out": str(out), "summary": summary}


def _feature_name(exported: ExportedLM, results: JsonObject) -> str | None:
    """The experiment's name for this LM's feature (its redundancy entry)."""
    if exported.kind == "cascade_finetuned" and results.get("lm"):  # one entry per E2 checkpoint
        return f"{exported.name}@{results['lm']['chosen']}"
    return exported.name
