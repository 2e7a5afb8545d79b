"""Joint-training throughput: today's trainer, the new recipe and a naive loop, side by side in one run.

    .venv/bin/python bench/bench_joint.py --data DIR [--steps 100] [--batch-size 32] [--torch-threads 1]
        [--out bench/results/joint]

DIR is a prepared, materialised dataset (`nlpctr data prepare`, `ctr-stats`, `features apply` and
`materialize`). The bench trains an E0 on it (the quick protocol's E0 loop), then warm-starts a
score-fusion joint model from it once per trainer and trains each for the same `--steps` steps on
the same batches of `--batch-size` training rows, the trainers' steps interleaved (A, B, C, D, A,
...) so that machine noise hits them alike:

- `today`: the trainer before the joint recipe: MiniLM's first 3 layers and its embeddings
  fine-tuned, each unique text of a batch encoded once from ids tokenised up front
  (`TextBatcher`), one AdamW over tower + fusion at lr 1e-3 and the LM at 5e-5 (the old
  `loop` defaults), unfused;
- `new_top2`, `new_top1`: the LM recipe's stage 1 (`models.recipe`): MiniLM's 6 layers, the top 2
  (or 1) trained on the cached states of the frozen layers below (`encoder.trainable_layers`,
  embeddings frozen), E0's tower frozen, the LM stage's head and LM rates, fused AdamW. The cache is
  filled before the clock starts, for every text of the dataset (as `fit_recipe` does); its cost
  is reported (`prefill_s`, `prefill_cpu_s`) and charged whole to one epoch in
  `rows_per_(cpu_)s_epoch_amortised` (pessimistic: it also serves validation and test passes);
  `new_top2_bf16` is `new_top2` with `encoder.autocast: bfloat16` (off by default);
- `naive`: the loop a user would write for the same model (6 layers, the same 2 top layers and
  head trainable, the same lrs): tokenise every row's text in the step (padding to the batch's
  longest), run the whole encoder, no deduplication, plain AdamW.

Reported per trainer: rows/s (wall) of the timed steps (the first 2 are warm-up), rows per CPU
second of the main thread (with 1 torch thread, the robust figure on a shared machine), the
validation log loss and AUC after the steps (E0's too), and the seconds of one validation pass.
Writes `OUT.json` and `OUT.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlpctr.features.names import BASELINE
from nlpctr.features.store import training_frame
from nlpctr.layout import read_manifest
from nlpctr.models import metrics
from nlpctr.models.config import load_config
from nlpctr.models.ctr_net import CtrModel, binomial_loss
from nlpctr.models.data import FeatureColumns, Tensors
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import param_groups
from nlpctr.models.runs import Preprocessing, build_model
from nlpctr.models.text_batches import TextBatcher, pair_text
from nlpctr.models.trainer import LoopConfig, fit
from nlpctr.pipelines.train import global_ctr

TARGET_SPEEDUP = 3.0
OLD = LoopConfig(lr=1e-3, lm_lr=5e-5)  # today's trainer: the old `loop` defaults


class Trainer:
    """One trainer: its model, LM, optimizer and step function, and its clocks."""

    def __init__(
        self,
        name: str,
        model: CtrModel,
        lm: TextEncoder,
        optimizer: torch.optim.Optimizer,
        step: Callable[[Trainer, torch.Tensor, Tensors], None],
        train_mode: Callable[[], None],
        texts: TextBatcher | None,
    ) -> None:
        self.name, self.model, self.lm, self.optimizer = name, model, lm, optimizer
        self.step, self.train_mode, self.texts = step, train_mode, texts
        self.wall = self.cpu = 0.0
        self.rows = 0


def warm_model(pre: Preprocessing, config: dict, e0: CtrModel, text_dim: int) -> CtrModel:
    model = build_model(pre, config, "score", text_dim)
    model.warm_start(e0)
    return model


def step_batched(trainer: Trainer, rows: torch.Tensor, data: Tensors) -> None:
    """The trainer's step: vectors of the batch's unique texts (`TextBatcher`), loss, update."""
    batch = data.take(rows)
    assert trainer.texts is not None
    logits = trainer.model(batch.categorical, batch.dense, (), trainer.texts.batch_vectors(batch))
    loss = binomial_loss(logits, batch.impressions, batch.clicks)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()


def step_naive(trainer: Trainer, rows: torch.Tensor, data: Tensors) -> None:
    """A plain loop: tokenise every row's text now, the whole encoder, no deduplication."""
    texts = [pair_text(*data.texts[i]) for i in data.text_index[rows].tolist()]
    encoded = trainer.lm.tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=trainer.lm.config.max_length,
        return_tensors="pt",
    )
    hidden = trainer.lm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    vectors = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
    logits = trainer.model(data.categorical[rows], data.dense[rows], (), vectors)
    loss = binomial_loss(logits, data.impressions[rows], data.clicks[rows])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()


def evaluate(model: CtrModel, data: Tensors, texts: TextBatcher | None) -> tuple[float, float, float]:
    """(valid log loss, valid AUC, seconds) of one validation pass."""
    valid = data.rows("valid")
    started = time.perf_counter()
    p = predict(model, data, valid, texts)
    seconds = time.perf_counter() - started
    labels = labels_of(data, valid)
    return metrics.logloss(labels, p), metrics.auc(labels, p), seconds


@dataclass
class Prepared:
    """The dataset as the trainers see it, and the E0 they warm-start from."""

    manifest: dict[str, Any]
    pre: Preprocessing
    data: Tensors
    e0: CtrModel
    e0_logloss: float
    e0_auc: float


def load_data(data_dir: Path) -> tuple[dict[str, Any], Preprocessing, Tensors]:
    """The prepared folder's baseline training frame, fitted and as tensors (as `nlpctr train`)."""
    manifest = read_manifest(data_dir)
    frame = training_frame(data_dir, BASELINE)
    pre = Preprocessing.fit(
        frame, FeatureColumns.for_manifest(manifest), manifest["group"], global_ctr(data_dir)
    )
    return manifest, pre, pre.tensorize(frame)


def prepare_e0(data_dir: Path, work: Path) -> Prepared:
    """The data and a quick E0 (the quick protocol's E0 loop) trained in `work`."""
    started = time.perf_counter()
    manifest, pre, data = load_data(data_dir)
    config = load_config("baseline", None, {"loop": {"epochs": 8, "patience": 2}})  # quick E0
    e0 = build_model(pre, config, None)
    shutil.rmtree(work, ignore_errors=True)  # never resume an E0 of other data
    e0_fit = fit(e0, data, config.loop, work, progress=False)
    e0.eval()
    e0_logloss, e0_auc, _ = evaluate(e0, data, None)
    assert e0_logloss == e0_fit.best.valid_logloss
    print(
        f"E0: valid log loss {e0_logloss:.6f}, AUC {e0_auc:.4f} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return Prepared(manifest, pre, data, e0, e0_logloss, e0_auc)


def today_trainer(p: Prepared, joint: Any) -> Trainer:
    """Today's trainer: 3 layers fine-tuned with their embeddings, the old defaults, unfused AdamW."""
    lm = TextEncoder(EncoderConfig(layers=3), trainable=True)
    model = warm_model(p.pre, joint, p.e0, lm.dim)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.parameters()), "lr": OLD.lr},
            {"params": list(lm.parameters()), "lr": OLD.lm_lr},
        ],
        weight_decay=OLD.weight_decay,
    )

    def train_all(model: CtrModel = model, lm: TextEncoder = lm) -> None:
        model.train()
        lm.train()

    return Trainer("today", model, lm, optimizer, step_batched, train_all, TextBatcher.for_data(lm, p.data))


def recipe_trainers(p: Prepared, joint: Any) -> tuple[list[Trainer], dict[str, tuple[float, float]]]:
    """The new recipe's stage 1, top 2 and top 1 layers trained on cached states (and top 2 in
    bf16), and each prefill's (wall, CPU) seconds."""
    recipe = joint.lm_loop  # the LM stage's rates: head `lr`, LM `lm_lr`
    trainers, prefill = [], {}
    for name, top, autocast in (
        ("new_top2", 2, None),
        ("new_top1", 1, None),
        ("new_top2_bf16", 2, "bfloat16"),
    ):
        settings = EncoderConfig(layers=6, trainable_layers=top, freeze_embeddings=True, autocast=autocast)
        lm = TextEncoder(settings, trainable=True)
        texts = TextBatcher.for_data(lm, p.data)
        began, cpu = time.perf_counter(), time.thread_time()
        if texts.prefill():  # (new_top2_bf16 shares new_top2's frozen prefix, hence its cache)
            prefill[name] = (time.perf_counter() - began, time.thread_time() - cpu)
        model = warm_model(p.pre, joint, p.e0, lm.dim)
        groups = param_groups(model, texts, 0.0, recipe.lr, recipe.lm_lr)
        optimizer = torch.optim.AdamW(groups, weight_decay=OLD.weight_decay, fused=True)

        def stage1_mode(model: CtrModel = model, lm: TextEncoder = lm) -> None:
            model.train()
            model.tower.eval()
            lm.train()

        trainers.append(Trainer(name, model, lm, optimizer, step_batched, stage1_mode, texts))
    return trainers, prefill


def naive_trainer(p: Prepared, joint: Any) -> Trainer:
    """The naive loop over the same model as new_top2."""
    recipe = joint.lm_loop
    lm = TextEncoder(EncoderConfig(layers=6), trainable=True)
    lm.model.embeddings.requires_grad_(False)
    for layer in list(lm.model.encoder.layer)[:4]:
        layer.requires_grad_(False)
    model = warm_model(p.pre, joint, p.e0, lm.dim)
    model.tower.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.fusion.parameters()), "lr": recipe.lr},  # type: ignore[union-attr]
            {"params": [p for p in lm.parameters() if p.requires_grad], "lr": recipe.lm_lr},
        ],
        weight_decay=OLD.weight_decay,
    )

    def naive_mode(model: CtrModel = model, lm: TextEncoder = lm) -> None:
        model.train()
        lm.train()

    naive_texts = TextBatcher.for_data(lm, p.data)  # validation only: the whole encoder, every text
    return Trainer("naive", model, lm, optimizer, step_naive, naive_mode, naive_texts)


def run_steps(trainers: list[Trainer], batches: list[torch.Tensor], data: Tensors) -> None:
    """Every trainer's steps, interleaved, the first two of each untimed (warm-up)."""
    for trainer in trainers:
        trainer.train_mode()
    torch.manual_seed(0)
    for i, rows in enumerate(batches):
        for trainer in trainers:
            wall, cpu = time.perf_counter(), time.thread_time()
            trainer.step(trainer, rows, data)
            if i >= 2:  # the first two steps warm up allocators and caches
                trainer.wall += time.perf_counter() - wall
                trainer.cpu += time.thread_time() - cpu
                trainer.rows += len(rows)
        if (i + 1) % 20 == 0:
            print(f"step {i + 1}/{len(batches)}", flush=True)


def trainer_rows(
    trainers: list[Trainer], data: Tensors, prefill: dict[str, tuple[float, float]], epoch_rows: int
) -> dict[str, dict[str, Any]]:
    """Each trainer's rates, validation after its steps, and its prefill charged to one epoch."""
    rows: dict[str, dict[str, Any]] = {}
    for trainer in trainers:
        trainer.model.eval()
        logloss, auc, seconds = evaluate(trainer.model, data, trainer.texts)
        rate = trainer.rows / trainer.wall
        entry = {
            "rows_per_s": rate,
            "rows_per_cpu_s": trainer.rows / trainer.cpu,
            "valid_logloss": logloss,
            "valid_auc": auc,
            "valid_pass_s": seconds,
            "trainable_lm_params": sum(p.numel() for p in trainer.lm.parameters() if p.requires_grad),
            "lm_layers": trainer.lm.config.layers,
        }
        filled = prefill.get(trainer.name, prefill.get(trainer.name.removesuffix("_bf16")))
        if filled is not None:  # the whole prefill charged to one epoch (it also serves evaluation)
            entry["prefill_s"], entry["prefill_cpu_s"] = filled
            entry["rows_per_s_epoch_amortised"] = epoch_rows / (epoch_rows / rate + filled[0])
            entry["rows_per_cpu_s_epoch_amortised"] = epoch_rows / (
                epoch_rows / entry["rows_per_cpu_s"] + filled[1]
            )
        rows[trainer.name] = entry
        print(f"{trainer.name}: {rate:.1f} rows/s, valid log loss {logloss:.6f}", flush=True)
    base = rows["today"]
    for entry in rows.values():
        entry["speedup_vs_today"] = entry["rows_per_s"] / base["rows_per_s"]
        entry["cpu_speedup_vs_today"] = entry["rows_per_cpu_s"] / base["rows_per_cpu_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--steps", type=int, default=100, help="timed steps of each trainer (after 2 warm-up)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/joint"))
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    p = prepare_e0(args.data, args.out.parent / "work" / "bench_joint_e0")
    joint = load_config("joint")
    today = today_trainer(p, joint)  # (built in this order: each draws its head's init from torch's RNG)
    recipe, prefill = recipe_trainers(p, joint)
    print(
        f"prefill: {', '.join(f'{k} {v[0]:.1f} s ({v[1]:.1f} CPU-s)' for k, v in prefill.items())}",
        flush=True,
    )
    trainers = [today, *recipe, naive_trainer(p, joint)]

    generator = torch.Generator().manual_seed(0)
    train_rows = p.data.rows("train")
    order = train_rows[torch.randperm(len(train_rows), generator=generator)]
    batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps + 2)]
    unique = float(np.mean([len(torch.unique(p.data.text_index[b])) for b in batches]))
    run_steps(trainers, batches, p.data)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    result = {
        "dataset": p.manifest["dataset"],
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_rows": len(train_rows),
        "unique_texts": len(p.data.texts),
        "mean_unique_texts_per_batch": unique,
        "e0": {"valid_logloss": p.e0_logloss, "valid_auc": p.e0_auc},
        "trainers": trainer_rows(trainers, p.data, prefill, len(train_rows)),
        "target_speedup": TARGET_SPEEDUP,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    e0 = result["e0"]
    header = ["trainer", "LM layers (trainable params)", "rows/s", "×today", "rows/CPU-s", "×today (CPU)"]
    header += ["rows/CPU-s incl. prefill, 1 epoch", "valid log loss after", "valid AUC", "validation pass s"]
    lines = [
        f"# Joint training throughput ({result['dataset']})",
        "",
        f"{result['steps']} steps of {result['batch_size']} training rows per trainer, interleaved, "
        f"warm-started from the same E0 (valid log loss {e0['valid_logloss']:.6f}, "
        f"AUC {e0['valid_auc']:.4f}); {result['machine']}; {result['when']}. "
        f"{result['unique_texts']:,} unique texts, {result['mean_unique_texts_per_batch']:.1f} per batch. "
        "`bench/bench_joint.py` describes the trainers.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in result["trainers"].items():
        amortised = "–"
        if "rows_per_cpu_s_epoch_amortised" in row:
            amortised = (
                f"{row['rows_per_cpu_s_epoch_amortised']:.1f} (prefill {row['prefill_cpu_s']:.0f} CPU-s)"
            )
        cells = [
            name,
            f"{row['lm_layers']} ({row['trainable_lm_params'] / 1e6:.1f}M)",
            f"{row['rows_per_s']:.1f}",
            f"{row['speedup_vs_today']:.2f}",
            f"{row['rows_per_cpu_s']:.1f}",
            f"{row['cpu_speedup_vs_today']:.2f}",
            amortised,
            f"{row['valid_logloss']:.6f}",
            f"{row['valid_auc']:.4f}",
            f"{row['valid_pass_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Goal: ≥ {result['target_speedup']:.0f}× today's trainer at equal or better validation loss.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
