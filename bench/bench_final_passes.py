"""A finished joint run's last two passes, with and without the text-vector cache, side by side.

    .venv/bin/python bench/bench_final_passes.py --data DIR [--layers 6] [--torch-threads 2]
        [--out bench/results/final_passes]

After training, a joint run scores its test split and then writes its LM feature for every
distinct text pair (`models.training.write_joint_features`). Both read the same, final LM
weights, so a text the test pass encoded need not be encoded again by the write-back.
`TextBatcher` keeps each text's vector while the weights hold (`cache_limit`); this bench runs
both passes on DIR's baseline frame with a score-fusion model (weights as initialised: what is
measured is the encoding, not the model) with the cache off (`cache_limit=0`, the code before)
and on, alternated `--repeats` times (the fastest of each is kept: a shared machine's noise only
slows), and reports texts encoded, wall seconds, and the largest difference between the two
settings' outputs. DIR is a prepared, materialised dataset.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlpctr.features.names import BASELINE
from nlpctr.features.store import training_frame
from nlpctr.layout import read_manifest
from nlpctr.models.config import load_config
from nlpctr.models.data import FeatureColumns
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.lm_features import lm_outputs, pairs_of, text_pairs
from nlpctr.models.prediction import predict
from nlpctr.models.runs import Preprocessing, build_model
from nlpctr.models.text_batches import CACHED_TEXTS, TextBatcher
from nlpctr.pipelines.train import global_ctr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/final_passes"))
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)

    manifest = read_manifest(args.data)
    frame = training_frame(args.data, BASELINE)
    pre = Preprocessing.fit(
        frame, FeatureColumns.for_manifest(manifest), manifest["group"], global_ctr(args.data)
    )
    data = pre.tensorize(frame)
    lm = TextEncoder(EncoderConfig(layers=args.layers), trainable=True)
    lm.eval()
    model = build_model(pre, load_config("joint"), "score", lm.dim)
    model.eval()
    assert model.fusion is not None
    test = data.rows("test")
    pairs = pairs_of(text_pairs(frame))

    runs: dict[str, dict[str, Any]] = {}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    settings = [("cache_off", 0), ("cache_on", CACHED_TEXTS)] * args.repeats
    for name, limit in settings:
        texts = TextBatcher.for_data(lm, data)
        texts.cache_limit = limit
        started = time.perf_counter()
        p_test = predict(model, data, test, texts)
        after_test = texts.encoded_at_inference
        written = lm_outputs(texts, {"lm_score": model.fusion.score}, pairs)
        seconds = time.perf_counter() - started
        if name not in runs or seconds < runs[name]["seconds"]:
            runs[name] = {
                "texts_encoded_test_pass": after_test,
                "texts_encoded_write_back": texts.encoded_at_inference - after_test,
                "texts_encoded": texts.encoded_at_inference,
                "seconds": seconds,
            }
        outputs[name] = (p_test, written["lm_score"])
        print(name, f"{seconds:.1f} s", runs[name], flush=True)
    (p_off, s_off), (p_on, s_on) = outputs["cache_off"], outputs["cache_on"]
    result = {
        "dataset": manifest["dataset"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "lm_layers": args.layers,
        "test_rows": len(test),
        "distinct_pairs": len(pairs),
        "distinct_texts": len(TextBatcher.for_data(lm, data).units),
        "runs": runs,
        "texts_encoded_ratio": runs["cache_off"]["texts_encoded"] / runs["cache_on"]["texts_encoded"],
        "speedup": runs["cache_off"]["seconds"] / runs["cache_on"]["seconds"],
        "max_abs_diff_test_p": float(np.abs(p_off - p_on).max()),
        "max_abs_diff_lm_score": float(np.abs(s_off - s_on).max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
