"""Joint-training throughput: the trainer's text path vs a naive loop, side by side in one run.

    python bench/bench_joint.py --data DIR [--layers 2] [--batch-size 32] [--steps 20]

Both do the same training step of a joint (score-fusion) model on the same batches of a
prepared, materialised dataset (`nlpctr features apply/materialize` first):
- trainer: `models.trainer.forward_rows` with a `TextBatcher`, i.e. each unique (query, ad)
  text of the batch is encoded once, from ids tokenised once up front, padded to the
  batch's longest text;
- naive: every row's text is tokenised in the step and encoded, padded to max_length.
Steps alternate between the two (A, B, A, B, ...) so machine noise hits both alike.
Prints rows/s of each, the ratio, and the unique-text and padding figures behind it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from nlpctr.features.definitions import BASELINE, read_manifest
from nlpctr.features.store import training_frame
from nlpctr.models import experiment
from nlpctr.models.ctr_net import binomial_loss
from nlpctr.models.data import FeatureColumns
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.trainer import TextBatcher, forward_rows, pair_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps of each variant")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_joint.json"))
    args = parser.parse_args()

    manifest = read_manifest(args.data)
    frame = training_frame(args.data, BASELINE, splits=["train"])
    columns = FeatureColumns.for_manifest(manifest)
    pre = experiment.Preprocessing.fit(frame, columns, manifest["group"], fill_ctr=0.05)
    data = pre.tensorize(frame)
    config = experiment.load_config("joint", None, {"encoder": {"layers": args.layers}})
    lm = TextEncoder(EncoderConfig(layers=args.layers), trainable=True)
    model = experiment.build_model(pre, config, "score", text_dim=lm.dim)
    texts = TextBatcher.for_data(lm, data)
    optimizer = torch.optim.AdamW([*model.parameters(), *lm.parameters()], lr=1e-4)
    model.train()
    lm.train()

    def step_trainer(rows: torch.Tensor) -> None:
        loss = binomial_loss(
            forward_rows(model, data, rows, texts), data.impressions[rows], data.clicks[rows]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step_naive(rows: torch.Tensor) -> None:
        batch_texts = [pair_text(*data.texts[i]) for i in data.text_index[rows].tolist()]
        encoded = lm.tokenizer(
            batch_texts,
            padding="max_length",
            truncation=True,
            max_length=lm.config.max_length,
            return_tensors="pt",
        )
        vectors = lm(encoded["input_ids"], encoded["attention_mask"])
        logits = model(data.categorical[rows], data.dense[rows], (), vectors)
        loss = binomial_loss(logits, data.impressions[rows], data.clicks[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    generator = torch.Generator().manual_seed(0)
    train_rows = data.rows("train")
    batches = [
        train_rows[torch.randperm(len(train_rows), generator=generator)[: args.batch_size]]
        for _ in range(args.steps + 2)
    ]
    unique = [len(torch.unique(data.text_index[b])) for b in batches]
    lengths = [[len(texts.tokens[i]) for i in torch.unique(data.text_index[b]).tolist()] for b in batches]
    padding = float(np.mean([1 - np.mean(ls) / max(ls) for ls in lengths]))
    naive_padding = float(
        np.mean(
            [
                1
                - np.mean([len(texts.tokens[i]) for i in data.text_index[b].tolist()]) / lm.config.max_length
                for b in batches
            ]
        )
    )
    seconds = {"trainer": 0.0, "naive": 0.0}
    for i, rows in enumerate(batches):
        for name, step in (("trainer", step_trainer), ("naive", step_naive)):
            started = time.perf_counter()
            step(rows)
            if i >= 2:  # the first two steps warm up allocators and caches
                seconds[name] += time.perf_counter() - started
    rows = args.steps * args.batch_size
    result = {
        "dataset": manifest["dataset"],
        "layers": args.layers,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "rows_per_s": {k: rows / v for k, v in seconds.items()},
        "speedup": seconds["naive"] / seconds["trainer"],
        "mean_unique_texts_per_batch": float(np.mean(unique)),
        "padding_waste": {"trainer": padding, "naive": naive_padding},
    }
    speed = result["rows_per_s"]
    print(
        f"{result['dataset']}: joint training, {args.layers} layers, batch {args.batch_size}, "
        f"{args.steps} steps each: trainer {speed['trainer']:.1f} rows/s vs naive {speed['naive']:.1f} "
        f"rows/s = {result['speedup']:.2f}x; {result['mean_unique_texts_per_batch']:.1f} unique texts per "
        f"{args.batch_size} rows; padding waste {padding:.1%} vs {naive_padding:.1%}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
