"""The full-size joint recipe and its probe-only control, on a GPU (`bench/gpu/run.sh`).

    python bench/gpu/train_gpu.py [--work bench/gpu/work] [--out results/gpu]
        [--datasets upworthy,simulated] [--device auto] [--precision auto] [--lm-seconds 330] [--smoke]

Reads what `bench/gpu/prepare.py` wrote (the device machine has no Beam, no Feast, no network
and no install of nlpctr: this imports `nlpctr.models` from the tree and MiniLM from the packed
weights). Per dataset, from the E0 prepared there:

- the joint arm by `models.recipe.fit_recipe` with `bench/gpu/recipe.yaml`: the probe (stage 0:
  the score head alone on the frozen LM's vectors), then the LM stage (E0's tower frozen, all six
  LM layers and the head), planned at `steps_multiple` (10) times the protocol's LM steps when
  the run was asked for (`today_steps`) at batch 256, with warmup and cosine decay;
- the probe-only control: the same run's stage-0 best state (the head on the frozen LM, no
  fine-tuning), the recipe without its LM stages;
- E0 itself.

The plan fits a time budget: 20 steps are timed first (`calibration`), and when the planned
steps would not fit `--lm-seconds` (shared by the datasets in proportion to their steps), the
stage shrinks and `reached_steps_multiple` says so. Writes `OUT/<dataset>.json` and
`OUT/summary.md`, and prints rows per second and the claims: joint vs E0, the probe vs E0 and
the joint arm vs its probe-only control (paired group-bootstrap CIs on test, `models.claims`
verdicts), and on the simulator each arm's share of the text ceiling (RIG, oracle-based).

`--smoke`: a 2-layer LM, a few hundred rows, 3 steps per stage, on whatever device: the whole
path in a minute on a CPU (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tree.py: nlpctr.models from this tree
from packed_encoder import use_packed_encoder
from tree import HERE, ROOT

from nlpctr.models import claims, metrics
from nlpctr.models.checkpoints import load_checkpoint
from nlpctr.models.config import TrainConfig, deep_merge, load_config
from nlpctr.models.ctr_net import binomial_loss
from nlpctr.models.data import Tensors
from nlpctr.models.device import Placement
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.evaluation import metric_report, paired_delta
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import fit_recipe, param_groups, plan
from nlpctr.models.runs import Preprocessing, build_model
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import BEST, FitResult

DATASETS = ("upworthy", "simulated")
CALIBRATION_STEPS, CALIBRATION_WARMUP = 20, 3
SMOKE_ROWS = {"train": 600, "valid": 200, "test": 200}


def load_tensors(path: Path) -> Tensors:
    """What `prepare.save_tensors` wrote, as `Tensors`."""
    z = np.load(path)
    queries, has_query, ads = z["query_text"].tolist(), z["has_query"].tolist(), z["ad_text"].tolist()
    return Tensors(
        categorical=torch.from_numpy(z["categorical"]),
        dense=torch.from_numpy(z["dense"]),
        cascade=(),
        impressions=torch.from_numpy(z["impressions"]),
        clicks=torch.from_numpy(z["clicks"]),
        text_index=torch.from_numpy(z["text_index"]),
        texts=[(q if h else None, a) for q, h, a in zip(queries, has_query, ads, strict=True)],
        split=z["split"].astype(object),
        groups=z["groups"].astype(object),
        impression_id=z["impression_id"].astype(object),
    )


def shrink(data: Tensors, rows: dict[str, int]) -> Tensors:
    """The first rows of each split, with only the texts they read (the smoke run)."""
    small = data.take(torch.cat([data.rows(split)[:n] for split, n in rows.items()]))
    used, index = torch.unique(small.text_index, return_inverse=True)
    return dataclasses.replace(small, text_index=index, texts=[data.texts[i] for i in used.tolist()])


def gpu_config(work: Path, placement: Placement, smoke: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The joint run's config (default.yaml's joint mode <- the protocol's train_config <- the
    recipe) and the recipe's own `gpu:` settings."""
    recipe = yaml.safe_load((HERE / "recipe.yaml").read_text())
    settings = recipe.pop("gpu")
    overrides = {**recipe, "device": str(placement.device), "precision": placement.precision}
    if smoke:
        overrides = deep_merge(
            overrides,
            {
                "lm_loop": {"batch_size": 32},
                "encoder": {"layers": 2},
                "recipe": {"probe": {"epochs": 1, "batch_size": 64}},
                "evaluation": {"bootstrap_rounds": 20},
            },
        )
    return load_config("joint", work / "train_config.yaml", overrides), settings


def step_seconds(
    model: torch.nn.Module, settings: EncoderConfig, data: Tensors, with_query: bool, config: TrainConfig,
    placement: Placement,
) -> float:  # fmt: skip
    """Seconds of one stage-1 training step (all LM layers, batch of the loop), timed on a copy."""
    lm = TextEncoder(settings, trainable=True, placement=placement)
    texts = TextBatcher.for_data(lm, data, with_query)
    texts.prefill()  # (the run's prefill then finds the shared cache filled)
    trial = copy.deepcopy(model)
    lm_loop = config.lm_loop
    groups = param_groups(trial, texts, 0.0, lm_loop.lr, lm_loop.lm_lr)
    optimizer = torch.optim.AdamW(groups, fused=True if placement.device.type == "cuda" else None)
    scaler = placement.grad_scaler()
    trial.train()
    trial.tower.eval()
    lm.train()
    batches = data.batches("train", lm_loop.batch_size, torch.Generator().manual_seed(1))
    started = 0.0
    for i, batch in enumerate(batches):
        if i == CALIBRATION_WARMUP:
            synchronize(placement)
            started = time.perf_counter()
        if i == CALIBRATION_WARMUP + CALIBRATION_STEPS:
            break
        batch = batch.to(placement.device)
        loss = binomial_loss(
            trial(batch.categorical, batch.dense, batch.cascade, texts.batch_vectors(batch)),
            batch.impressions,
            batch.clicks,
        )
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    synchronize(placement)
    steps = min(CALIBRATION_STEPS, max(i - CALIBRATION_WARMUP, 1))
    return (time.perf_counter() - started) / steps


def synchronize(placement: Placement) -> None:
    if placement.device.type == "cuda":
        torch.cuda.synchronize(placement.device)


def plan_steps(
    today: dict[str, int], multiple: int, n_batches: int, affordable: float | None
) -> dict[str, Any]:
    """Steps per LM stage: `multiple` x today's, both scaled down alike to what is affordable;
    each stage's epochs of `per_epoch` batches (a cap of the shared loop, at most an epoch)."""
    target = {stage: multiple * steps for stage, steps in today.items()}
    scale = 1.0 if affordable is None else min(1.0, affordable / sum(target.values()))
    wanted = {stage: max(1, int(steps * scale)) for stage, steps in target.items()}
    smallest = min(wanted.values())
    per_epoch = min(n_batches, math.ceil(smallest / math.ceil(smallest / n_batches)))
    epochs = {stage: math.ceil(steps / per_epoch) for stage, steps in wanted.items()}
    planned = {stage: epochs[stage] * per_epoch for stage in wanted}
    return {
        "today": today,
        "target": target,
        "planned": planned,
        "epochs": epochs,
        "per_epoch": per_epoch,
        "multiple_planned": min(planned[s] / today[s] for s in today),
        "reached_steps_multiple": all(planned[s] >= target[s] for s in target),
    }


def predict_test(model: torch.nn.Module, texts: TextBatcher | None, data: Tensors) -> np.ndarray:
    return predict(model, data, data.rows("test"), texts)


def probe_control(
    model: torch.nn.Module, settings: EncoderConfig, data: Tensors, with_query: bool, checkpoint: Path,
    placement: Placement,
) -> np.ndarray:  # fmt: skip
    """Test predictions of the probe stage's best state: the head on the frozen, untrained LM."""
    state = load_checkpoint(checkpoint, placement.device)
    control = copy.deepcopy(model)
    control.load_state_dict(state["model"])
    lm = TextEncoder(settings, placement=placement)
    lm.load_state_dict(state["lm"])
    return predict_test(control, TextBatcher.for_data(lm, data, with_query), data)


def run_dataset(
    name: str, work: Path, args: argparse.Namespace, placement: Placement, seconds: float | None
) -> dict:
    """One dataset: E0, the joint arm and its probe-only control, their test metrics and claims."""
    started = time.perf_counter()
    folder = work / name
    meta = json.loads((folder / "meta.json").read_text())
    data = load_tensors(folder / "tensors.npz")
    if args.smoke:
        data = shrink(data, SMOKE_ROWS)
    pre = Preprocessing.from_json(meta["preprocessing"])
    e0 = build_model(pre, TrainConfig.from_dict(meta["e0_config"]), None).to(placement.device)
    e0.load_state_dict(load_checkpoint(folder / "e0.pt", placement.device))
    config, gpu = gpu_config(folder, placement, args.smoke)
    settings = dataclasses.replace(config.encoder, pair_reading=meta["pair_reading"])
    with_query = bool(meta["with_query"])
    lm = TextEncoder(settings, trainable=True, placement=placement)
    texts = TextBatcher.for_data(lm, data, with_query)
    model = build_model(pre, config, gpu["fusion"], texts.dim).to(placement.device)
    model.warm_start(e0)
    loop = config.lm_loop
    n_batches = math.ceil(data.rows_in("train") / loop.batch_size)
    today = {"lm": 1} if args.smoke else meta["today_steps"]
    multiple = 3 if args.smoke else int(gpu["steps_multiple"])
    calibration = None
    if not args.smoke:
        seconds_per_step = step_seconds(model, settings, data, with_query, config, placement)
        calibration = {"step_seconds": seconds_per_step, "rows_per_s": loop.batch_size / seconds_per_step}
    affordable = seconds / calibration["step_seconds"] if calibration and seconds else None
    steps = plan_steps(today, multiple, n_batches, affordable)
    smallest = min(steps["planned"].values())
    loop = dataclasses.replace(
        loop,
        epochs=steps["epochs"]["lm"],
        max_batches_per_epoch=steps["per_epoch"],
        eval_every_steps=max(1, smallest // int(gpu["evaluations_per_stage"])),
        warmup_steps=max(1, int(smallest * float(gpu["warmup_share"]))),
    )
    stages = plan(loop, config.recipe, warm_started=True, has_tower=True, tower_lr=0.0)
    print(
        f"[gpu] {name}: {data.rows_in('train'):,} train rows, {len(data.texts):,} texts; plan "
        f"{steps['planned']} LM steps ({steps['multiple_planned']:.1f}x today's {today}) at batch "
        f"{loop.batch_size} on {placement}"
        + (f"; a step {calibration['step_seconds'] * 1e3:.0f} ms" if calibration else ""),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        fit = fit_recipe(model, data, stages, Path(tmp), texts, progress=False)
        p_probe = probe_control(model, settings, data, with_query, Path(tmp) / "stage0" / BEST, placement)
    p_joint = predict_test(model, texts, data)
    p_e0 = predict_test(e0, None, data)
    return summarise(name, meta, config, data, fit, steps, calibration, placement, started, {
        "e0": p_e0, "probe": p_probe, "joint": p_joint,
    }, folder)  # fmt: skip


def lm_throughput(fit: FitResult, batch_size: int) -> dict[str, float]:
    """Rows per second of the LM stages (their wall time, validation included)."""
    stages = [s for s in fit.stages if s["name"] != "head"]
    rows = sum(s["steps"] * s["batch_size"] for s in stages)
    wall = sum(s["wall_seconds"] for s in stages)
    return {"rows": rows, "wall_seconds": wall, "rows_per_s": rows / wall if wall else float("nan")}


def summarise(
    name: str, meta: dict, config: TrainConfig, data: Tensors, fit: FitResult, plan: dict,
    calibration: dict | None, placement: Placement, started: float, p: dict[str, np.ndarray], folder: Path,
) -> dict[str, Any]:  # fmt: skip
    """Test metrics, the claims and the throughput of one dataset."""
    test = data.rows("test")
    labels = labels_of(data, test)
    evaluation, train_ctr = config.evaluation, float(meta["train_ctr"])
    reports = {arm: metric_report(labels, values, train_ctr, evaluation) for arm, values in p.items()}
    found = [
        claims.from_delta(
            "joint_beats_e0",
            "the joint arm (all LM layers fine-tuned) beats E0 end to end",
            paired_delta(labels, p["joint"], p["e0"], train_ctr, evaluation),
        ),
        claims.from_delta(
            "probe_beats_e0",
            "the probe-only control (the head on the frozen LM) beats E0",
            paired_delta(labels, p["probe"], p["e0"], train_ctr, evaluation),
        ),
        claims.from_delta(
            "finetuning_beats_probe",
            "fine-tuning the LM jointly adds to the probe-only control",
            paired_delta(labels, p["joint"], p["probe"], train_ctr, evaluation),
        ),
    ]
    result: dict[str, Any] = {
        "dataset": name,
        "source": meta["dataset"],
        "placement": placement.to_dict(),
        "rows": {split: data.rows_in(split) for split in ("train", "valid", "test")},
        "texts": len(data.texts),
        "steps": {**plan, "taken": {s["name"]: s["steps"] for s in fit.stages}},
        "calibration": calibration,
        "throughput": lm_throughput(fit, config.lm_loop.batch_size),
        "stages": fit.stages,
        "history": fit.history_json(),
        "test": {
            arm: {k: r[k] for k in ("auc", "auc_ci", "rig", "rig_ci", "logloss", "gauc")}
            for arm, r in reports.items()
        },
        "claims": [c.to_dict() for c in found],
        "config": {k: config.to_dict()[k] for k in ("lm_loop", "encoder", "recipe")},
        "wall_seconds": time.perf_counter() - started,
    }
    truth = folder / "truth.npz"
    if truth.is_file():  # the test rows' oracles, in test-row order (--smoke keeps the first rows)
        oracle = {k: v[: len(test)] for k, v in np.load(truth).items()}
        rig = {arm: reports[arm]["rig"] for arm in reports}
        oracle_rig = metrics.rig(labels, oracle["oracle"], train_ctr)
        no_text_rig = metrics.rig(labels, oracle["no_text"], train_ctr)
        gap = oracle_rig - no_text_rig
        result["text_ceiling"] = {
            "oracle_rig": oracle_rig,
            "no_text_oracle_rig": no_text_rig,
            "share_rig": {arm: (rig[arm] - rig["e0"]) / gap for arm in ("probe", "joint")},
        }
    return result


def line(result: dict[str, Any]) -> str:
    """One dataset's figures and claims, for stdout and the summary."""
    test, steps, speed = result["test"], result["steps"], result["throughput"]
    verdicts = "; ".join(
        f"{c['id']} {c['estimate']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] {c['verdict']}"
        for c in result["claims"]
    )
    share = result.get("text_ceiling", {}).get("share_rig")
    shares = (
        f"; text-ceiling share (RIG) probe {share['probe']:.3f}, joint {share['joint']:.3f}" if share else ""
    )
    return (
        f"{result['dataset']}: test AUC E0 {test['e0']['auc']:.4f}, probe {test['probe']['auc']:.4f}, "
        f"joint {test['joint']['auc']:.4f}; LM stages {speed['rows_per_s']:,.0f} rows/s "
        f"({steps['taken']} steps of {steps['planned']} planned, {steps['multiple_planned']:.1f}x today's); "
        f"{verdicts}{shares}; {result['wall_seconds']:.0f} s"
    )


def summary_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["# The joint recipe on a GPU (bench/gpu/run.sh)", ""]
    for result in results:
        place = result["placement"]
        lines += [
            f"## {result['dataset']}",
            "",
            f"{place['device_name']} ({place['device']}, {place['precision']}, torch {place['torch']}); "
            f"{result['rows']['train']:,} train rows, {result['texts']:,} texts.",
            "",
            line(result),
            "",
            "| arm | test AUC [95% CI] | RIG [95% CI] | log loss |",
            "|---|---|---|---|",
        ]
        for arm, report in result["test"].items():
            auc, rig = report["auc_ci"], report["rig_ci"]
            lines.append(
                f"| {arm} | {report['auc']:.4f} [{auc[0]:.4f}, {auc[1]:.4f}] | {report['rig']:.4f} "
                f"[{rig[0]:.4f}, {rig[1]:.4f}] | {report['logloss']:.5f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work", help="bench/gpu/prepare.py's folder")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/gpu (--smoke: runs/gpu-smoke)"
    )
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--lm-seconds", type=float, default=330.0, help="LM stages' time, all datasets")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: the whole path in a minute on a CPU"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out or (ROOT / ("runs/gpu-smoke" if args.smoke else "results/gpu"))
    names = [n for n in args.datasets.split(",") if n]
    missing = [n for n in names if not (args.work / n / "meta.json").is_file()]
    if missing or not (args.work / "encoder").is_dir():
        raise SystemExit(f"{args.work} lacks {missing or 'encoder'}: run bench/gpu/prepare.py first (here)")
    placement = Placement.resolve(args.device, args.precision)
    use_packed_encoder(args.work / "encoder")
    torch.manual_seed(0)
    weights = {
        n: sum(json.loads((args.work / n / "meta.json").read_text())["today_steps"].values()) for n in names
    }
    results = []
    for name in names:
        seconds = args.lm_seconds * weights[name] / sum(weights.values())
        result = run_dataset(name, args.work, args, placement, seconds)
        results.append(result)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"[gpu] {line(result)}", flush=True)
    (out / "summary.md").write_text(summary_markdown(results))
    print(f"[gpu] {len(results)} dataset(s) in {time.perf_counter() - started:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
