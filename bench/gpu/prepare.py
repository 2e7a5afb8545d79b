"""Prepare, here, what `bench/gpu/run.sh` trains on a GPU machine that has no Beam, no Feast and
no network: compact training tensors, a trained E0 and the MiniLM weights.

    .venv/bin/python bench/gpu/prepare.py [--work bench/gpu/work] [--datasets upworthy,simulated]
        [--sim-rows 50000] [--no-progress]

Per dataset it runs the protocol's first steps (`nlpctr data prepare` or `data simulate` at
rho = 0.5 with the sweep's settings, `ctr-stats`, `features apply`), reads E0's training frame
from Feast, tensorises it and trains E0 on it with the protocol's configuration (CPU, float32:
what `nlpctr experiment` trains), then writes `WORK/<dataset>/`:

- `tensors.npz`: the rows as `models.data.Tensors` holds them (ids, dense features, labels, text
  pairs, splits, groups), compressed;
- `meta.json`: the preprocessing, the train CTR, E0's configuration and the protocol's joint-arm
  steps that the GPU recipe multiplies (`today_steps`, from the committed full-protocol runs);
- `e0.pt`: E0's weights; `truth.npz` (simulator): the oracle and no-text click probabilities of
  the test rows, for the share of the text ceiling.

`WORK/encoder/` holds MiniLM-L6 as `bench/gpu/packed_encoder.py` packs it: the tokenizer files and
float16 weights, the word-embedding table cut to the token ids the datasets' texts use (the
rest are never read). The whole of WORK must travel with the tree in 64 MiB (the size is printed
and checked). Nothing here is committed (`bench/gpu/work/` is ignored); rerunning replaces WORK.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from packed_encoder import pack_encoder  # noqa: E402  (bench/gpu/packed_encoder.py)

from nlpctr.features import store as feature_store  # noqa: E402
from nlpctr.features.names import BASELINE  # noqa: E402
from nlpctr.layout import read_manifest  # noqa: E402
from nlpctr.models import ceilings  # noqa: E402
from nlpctr.models.config import load_config  # noqa: E402
from nlpctr.models.data import FeatureColumns, Tensors  # noqa: E402
from nlpctr.models.device import CPU  # noqa: E402
from nlpctr.models.prediction import labels_of  # noqa: E402
from nlpctr.models.training import FitInputs, fit_ctr, train_ctr  # noqa: E402
from nlpctr.pipelines import ctr_stats, feature_store_cli, ingest, simulate  # noqa: E402
from nlpctr.pipelines.experiment.config import Protocol, load_protocol  # noqa: E402
from nlpctr.pipelines.train import global_ctr  # noqa: E402

DATASETS = ("upworthy", "simulated")
SIM_RHO = 0.5
CARRY_LIMIT = 64 * 2**20  # what a device call carries, tree included
# The joint arm's LM steps (its two stages together) in the full-protocol runs committed when the
# GPU run was asked for (results/upworthy: joint_score 568 + 400; results/simulated rho 0.5: 300 +
# 300), at batch 32: what "10x today's steps" counts. The GPU recipe runs them as one LM stage.
TODAY_STEPS = {"upworthy": {"lm": 968}, "simulated": {"lm": 600}}


def prepare_data(name: str, root: Path, sim_rows: int, protocol: Protocol, progress: bool) -> Path:
    """The protocol's data steps for one dataset under `root`; returns the prepared data folder."""
    data = root / f"{name}-data"
    quiet = [] if progress else ["--no-progress"]
    if name == "simulated":
        settings = protocol.simulator
        log = root / "simulated-log" / "log.parquet"
        flags = ["--rows", str(sim_rows), "--rho", str(SIM_RHO), "--seed", "0", "--out", str(log)]
        flags += ["--text-strength", str(settings.text_strength)]
        flags += ["--impressions-per-row", str(settings.impressions_per_row)]
        simulate.run(flags + quiet)
        source = str(log.with_name("log.spec.yaml"))
    else:
        source = name
    ingest.run(["--dataset", source, "--out", str(data), "--seed", "0"])
    ctr_stats.run(["--data", str(data)])
    feature_store_cli.run(["apply", "--data", str(data)])
    return data


def save_tensors(data: Tensors, path: Path) -> None:
    """`Tensors` as arrays (strings as fixed-width unicode: no pickles); `bench/gpu/train_gpu.py`
    reads them back."""
    queries = [q if q is not None else "" for q, _ in data.texts]
    np.savez_compressed(
        path,
        categorical=data.categorical.numpy(),
        dense=data.dense.numpy(),
        impressions=data.impressions.numpy(),
        clicks=data.clicks.numpy(),
        text_index=data.text_index.numpy(),
        query_text=np.array(queries, dtype=str),
        has_query=np.array([q is not None for q, _ in data.texts]),
        ad_text=np.array([a for _, a in data.texts], dtype=str),
        split=data.split.astype(str),
        groups=data.groups.astype(str),
        impression_id=data.impression_id.astype(str),
    )


def prepare_set(name: str, data_dir: Path, out: Path, protocol: dict[str, Any], progress: bool) -> list[str]:
    """E0 trained on the dataset's training frame, and the files `train_gpu.py` reads; returns
    every text the LM will read (for the encoder's vocabulary cut)."""
    manifest = read_manifest(data_dir)
    frame = feature_store.training_frame(data_dir, BASELINE)
    out.mkdir(parents=True, exist_ok=True)
    train_config = out / "train_config.yaml"
    train_config.write_text(yaml.safe_dump(protocol.train_config, sort_keys=True))
    placement = {"device": "cpu", "precision": "fp32", "loop": {"seed": 0}}
    config = load_config("baseline", train_config, placement)
    inputs = FitInputs(manifest, config, global_ctr(data_dir), progress=progress, placement=CPU)
    with tempfile.TemporaryDirectory() as tmp:
        pre, data, model, _, fit = fit_ctr(frame, FeatureColumns.for_manifest(manifest), inputs, Path(tmp))
    torch.save(model.state_dict(), out / "e0.pt")
    save_tensors(data, out / "tensors.npz")
    meta = {
        "dataset": manifest["dataset"],
        "group": manifest["group"],
        "preprocessing": pre.to_json(),
        "fill_ctr": inputs.fill_ctr,
        "train_ctr": train_ctr(labels_of(data, data.rows("train"))),
        "e0_config": config.to_dict(),
        "e0_best_valid_logloss": fit.best.valid_logloss,
        "with_query": bool(manifest["spec"]["columns"].get("query_text")),
        "pair_reading": "separate" if name == "simulated" else "cross",  # as the protocol reads them
        "today_steps": TODAY_STEPS[name],
        "rows": {split: data.rows_in(split) for split in ("train", "valid", "test")},
    }
    if name == "simulated":
        test = data.rows("test").numpy()
        truth = ceilings.truth_file_for(manifest["source"])
        oracle, no_text = ceilings.oracle_probabilities(truth, data.impression_id[test].astype(str).tolist())
        np.savez_compressed(out / "truth.npz", oracle=oracle, no_text=no_text)
        meta["rho"] = SIM_RHO
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [text for pair in data.texts for text in pair if text is not None]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes() -> int:
    """What a device call carries besides WORK: the tracked and untracked, not ignored files."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [ROOT / p.decode() for p in listed if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "gpu" / "work")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: upworthy, simulated")
    parser.add_argument("--sim-rows", type=int, default=None, help="simulated rows (default: the sweep's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    if not names or set(names) - set(DATASETS):
        parser.error(f"--datasets takes {', '.join(DATASETS)}")
    started = time.perf_counter()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    texts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            protocol = load_protocol(False, None, simulated=name == "simulated")
            rows = args.sim_rows or int(protocol.simulator.rows)
            data_dir = prepare_data(name, Path(tmp), rows, protocol, not args.no_progress)
            texts += prepare_set(name, data_dir, work / name, protocol, not args.no_progress)
            print(f"{name}: {folder_bytes(work / name) / 2**20:.1f} MiB", flush=True)
    packed = pack_encoder(work / "encoder", texts)
    total = folder_bytes(work) + tree_bytes()
    print(
        f"encoder: {folder_bytes(work / 'encoder') / 2**20:.1f} MiB ({packed['rows_kept']:,} of "
        f"{packed['vocab_size']:,} embedding rows, float16: max rounding "
        f"{packed['max_abs_rounding']:.1e}); work + tree {total / 2**20:.1f} MiB of 64; "
        f"{time.perf_counter() - started:.0f} s -> {work}"
    )
    if total > CARRY_LIMIT:
        raise SystemExit(f"work + tree is {total / 2**20:.1f} MiB, over the 64 MiB a device call carries")


if __name__ == "__main__":
    main()
