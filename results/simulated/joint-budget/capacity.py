"""How much of the simulator's text effects a linear read-out of frozen MiniLM vectors finds, per
way of reading a (query, ad) pair: the joint arm's one cross-encoded text ("query [SEP] ad",
mean-pooled), or E1's separate query and ad vectors. Writes capacity.json beside this file.

Run from the repository root after the sweep (it reads runs/simulated/rho-0):
    .venv/bin/python results/simulated/joint-budget/capacity.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import RidgeCV

from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.text_batches import pair_text

SEED, TRAIN, TEST = 0, 5000, 2000
ALPHAS = np.logspace(-2, 3, 12)
here = Path(__file__).parent
log_dir = Path("runs/simulated/rho-0/log")
rows = pq.read_table(log_dir / "log.parquet", columns=["impression_id", "query_text", "ad_text"]).to_pandas()
truth = pq.read_table(log_dir / "log.truth.parquet", columns=["impression_id", "t_ad", "t_pair"]).to_pandas()
pairs = rows.merge(truth, on="impression_id").drop_duplicates(["query_text", "ad_text"])
pairs = pairs.sample(TRAIN + TEST, random_state=SEED)
encoder = TextEncoder(EncoderConfig(layers=6, max_length=32))
cross = encoder.encode([pair_text(q, a) for q, a in zip(pairs.query_text, pairs.ad_text, strict=True)])
query, ad = encoder.encode(list(pairs.query_text)), encoder.encode(list(pairs.ad_text))
cosine = (query * ad).sum(1) / np.linalg.norm(query, axis=1) / np.linalg.norm(ad, axis=1)
readings = {
    "cross (joint arm)": cross,
    "query, ad (E1)": np.c_[query, ad],
    "query, ad, query*ad": np.c_[query, ad, query * ad],
    "cosine(query, ad)": cosine[:, None],
}
out: dict = {"pairs": {"train": TRAIN, "test": TEST, "seed": SEED}, "encoder": encoder.config.version}
out["r2"] = {}
for name, x in readings.items():
    out["r2"][name] = {}
    for target in ("t_pair", "t_ad"):
        y = pairs[target].to_numpy()
        fit = RidgeCV(alphas=ALPHAS).fit(x[:TRAIN], y[:TRAIN])
        out["r2"][name][target] = round(float(fit.score(x[TRAIN:], y[TRAIN:])), 4)
    print(f"{name:22s} test R2  t_pair {out['r2'][name]['t_pair']:+.3f}  t_ad {out['r2'][name]['t_ad']:+.3f}")
(here / "capacity.json").write_text(json.dumps(out, indent=1) + "\n")
