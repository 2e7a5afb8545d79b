"""A sponsored-search click log with a known redundancy knob (`nlpctr data simulate`).

    nlpctr data simulate --rows 1000000 --redundancy 0.5 --seed 0 --out data/sim/log.parquet
    nlpctr data simulate --rows 20000 --redundancy 0.5 --impressions-per-row 50 --out data/sim/agg.parquet

It validates the redundancy measures of DESIGN.md: how much of an NLP feature the ID
features already know, and what text adds over them, are known here by construction.

The world (sized from --rows, kept in memory)
- Texts are composed from the REAL texts under the data root: TREC 2013 queries and result
  titles, ESCI shopping queries and product titles, Upworthy headlines (cleaned, deduped).
- Advertisers have a brand (harvested from real product titles) and a house style: how often
  their ads add a number, a superlative, a deal, a question, a "you" phrase or the brand.
  An ad is a real title (from its advertiser's source) plus those fragments; its text is fixed.
- A query is a real query, sometimes with commercial, numeric or question modifiers or a brand.
- Each query has up to 12 eligible ads (an auction's candidates): about half share a content
  word with it (an inverted index over ad words), the rest are random, so within one ad the
  query-ad overlap varies. P(query) is Zipf-like; P(ad | query) is uniform over its candidates.

The click model (per impression; every coefficient is written to <stem>.truth.json)
    logit = base + u_ad + u_advertiser + u_query + pos(position) + dev(device) + text
    text  = beta * (sqrt(rho) * T_ad + sqrt(1 - rho) * T_pair)
    click ~ Bernoulli(sigmoid(logit))
    (--impressions-per-row N: clicks ~ Binomial(N, sigmoid(logit)) on a row of N impressions)
- u_* ~ N(0, sd_*^2) per entity; pos = -0.8 ln(position); dev is fixed per device.
- --numeric-features K adds columns numeric_1..numeric_K (float, >= 0, right-skewed) drawn per
  row independently of everything else, and numeric = sum_k w_k (log1p(numeric_k) - 2) to the
  logit (w_k = 0.5 * (-0.6)^(k-1), in truth.json); the spec maps them with log1p.
- T_ad depends only on the ad's own text: a weighted sum of lexical cues (contains a number,
  a superlative, a deal word, a brand-ish token, a "you" word, a question mark, and a length
  penalty), standardised to mean 0 / variance 1 over impressions.
- T_pair depends on the query-ad pair's texts: the share of the query's content words that
  the ad contains, plus word-class agreement (numeric query x ad with a number, question query
  x informative ad, commercial query x deal ad, branded query x branded ad). It is then
  double-centred by weighted backfitting over the auction graph, so that its impression-weighted
  mean is 0 within every ad, advertiser and query: no ID (nor its historical CTR) can know it.
  The part removed by centering is reported (`t_pair.raw_variance_removed`). Standardised.
- T_ad and T_pair are orthogonal over impressions, so the text effect has variance beta^2 for
  every rho, and the share of it an ad ID can explain is exactly rho (population R^2 of text on
  the ad's mean text effect): rho = 0 -> text is fully supplementary; rho = 1 -> text adds
  nothing the ad ID does not know. Nothing is defined through an embedding: every cue is a
  fixed word class, length or lexical overlap, which a language model can learn from the text.
- Position and device are drawn independently of the ad and query, so they do not confound.

Aggregated rows (--impressions-per-row N): each row is one (query, ad, position, device,
day) cell shown N times, with `impressions` = N and `clicks` ~ Binomial(N, p) instead of
`clicked`, and the spec reads it as `label: {form: aggregated, ...}`. The world (entity counts)
is sized from --rows as before, so each ad gets N times the impressions: E0's ID and CTR
history features become precise at a row count the CPU can train on. The truth is per row,
unchanged (every impression of a row has the same click probability).

Outputs, beside FILE (written to temporary names first and renamed, so a crash leaves none;
existing files are replaced only when they are this command's earlier output, named by the
<stem>.truth.json it wrote, else the run is refused before anything is written)
- FILE: the log (impression_id, event_time, query_id, query_text, ad_id, ad_text,
  advertiser_id, position, device, clicked | impressions + clicks), time-ordered over 30 days
  from 2024-03-01 UTC.
- <stem>.truth.parquet: impression_id + base, ad/advertiser/query/position/device/text
  effects (and numeric_effect with --numeric-features), t_ad, t_pair, logit, click_prob, rho
  (components sum to the logit).
- <stem>.truth.json: rho, seed, rows, coefficients, entity counts, realised CTR, variance of
  each logit component and its share of the logit's variance.
- <stem>.spec.yaml: a dataset spec for `nlpctr data prepare --dataset <stem>.spec.yaml`.

Rows are generated and written in chunks (--chunk-rows), so memory stays bounded; the same
seed, rows and chunk size give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from nlpctr import __version__
from nlpctr.atomic import atomic_path
from nlpctr.errors import UserError
from nlpctr.pipelines.ownership import claim_output_files, is_simulated_log
from nlpctr.pipelines.simulator.clicks import (
    DAYS,
    DEVICE_EFFECT,
    DEVICE_SHARE,
    DEVICES,
    MAX_NUMERIC_FEATURES,
    NUMERIC_LOG_MEAN,
    POSITION_DECAY,
    POSITION_SLOPE,
    START,
    Moments,
    Params,
    components,
    log_schema,
    simulate_chunk,
    truth_schema,
)
from nlpctr.pipelines.simulator.lexicon import T_AD_WEIGHTS, load_pools
from nlpctr.pipelines.simulator.world import (
    SD_AD,
    SD_ADVERTISER,
    SD_QUERY,
    T_PAIR_WEIGHTS,
    build_world,
)
from nlpctr.pipelines.specs import data_root

DEFAULT_CHUNK_ROWS = 200_000


# ------------------------------------------------------------------------------- outputs


def spec_for(log_path: Path, params: Params) -> dict[str, Any]:
    """The dataset spec of the simulated log; source.path is relative to the spec file."""
    stem = log_path.name.removesuffix(".parquet")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", stem).strip("_-")
    name = name if name.replace("_", "").replace("-", "").isalnum() else "simulated"
    if params.impressions_per_row is None:
        label: dict[str, str] = {"form": "binary", "clicked": "clicked"}
        rows = f"{params.rows} rows"
    else:
        label = {"form": "aggregated", "impressions": "impressions", "clicks": "clicks"}
        rows = f"{params.rows} rows of {params.impressions_per_row} impressions"
    return {
        "name": name,
        "description": (
            f"Simulated sponsored-search log: {rows}, redundancy rho={params.rho}, "
            f"seed={params.seed}; ground truth in {stem}.truth.parquet"
        ),
        "source": {"path": log_path.name, "format": "parquet"},
        "columns": {
            "impression_id": "impression_id",
            "query_id": "query_id",
            "query_text": "query_text",
            "ad_id": "ad_id",
            "ad_text": "ad_text",
        },
        "context": {"position": "position", "device": "device", "advertiser_id": "advertiser_id"},
        **(
            {"numeric": {name: {"column": name, "log1p": True} for name in params.numeric_names}}
            if params.numeric_features
            else {}
        ),
        "timestamp": {"column": "event_time", "format": "iso8601"},
        "label": label,
        "group": "query_id",
        "entities": ["ad_id", "advertiser_id", "query_id", "position"],
        "split": {"mode": "time", "fractions": [0.8, 0.1, 0.1]},
        "max_text_chars": 1000,
        "max_reject_rate": 0.0,
        "notes": "Generated by nlpctr data simulate; every row is valid, so none may be rejected.",
    }


def _paths(out: Path) -> dict[str, Path]:
    stem = out.name.removesuffix(".parquet")
    return {
        "log": out,
        "truth": out.with_name(f"{stem}.truth.parquet"),
        "truth_json": out.with_name(f"{stem}.truth.json"),
        "spec": out.with_name(f"{stem}.spec.yaml"),
    }


def truth_record(
    params: Params, world_info: dict[str, Any], paths: dict[str, Path], moments: Moments, clicks: int
) -> dict[str, Any]:
    """truth.json's content: the model, its coefficients, the world, and the realised moments."""
    logit_var = moments.variance("logit")
    return {
        "generator": "nlpctr data simulate",
        "code_version": __version__,
        "rho": params.rho,
        "seed": params.seed,
        "rows": params.rows,
        "impressions_per_row": params.impressions_per_row,
        "impressions": params.impressions,
        "chunk_rows": params.chunk_rows,
        "files": {key: path.name for key, path in paths.items()},
        "model": {
            "logit": " + ".join(components(params)),
            "text_effect": "text_strength * (sqrt(rho) * t_ad + sqrt(1 - rho) * t_pair)",
            "click": (
                "Bernoulli(sigmoid(logit))"
                if params.impressions_per_row is None
                else f"clicks ~ Binomial({params.impressions_per_row}, sigmoid(logit)) per row"
            ),
            "t_ad": "standardised sum of t_ad_weights over the ad text's cues (ad text only)",
            "t_pair": "standardised, double-centred (zero mean within every ad and query) sum of "
            "t_pair_weights over query-ad overlap and word-class agreement",
            **(
                {
                    "numeric_effect": "sum over k of numeric_weights[k] * "
                    f"(log1p(numeric_k) - {NUMERIC_LOG_MEAN:g}); log1p(numeric_k) - "
                    f"{NUMERIC_LOG_MEAN:g} ~ N(0, 1) clipped at -{NUMERIC_LOG_MEAN:g}, per row"
                }
                if params.numeric_features
                else {}
            ),
        },
        "coefficients": {
            "base": params.base,
            "text_strength": params.text_strength,
            "sd_ad": SD_AD,
            "sd_advertiser": SD_ADVERTISER,
            "sd_query": SD_QUERY,
            "position_slope_ln": POSITION_SLOPE,
            "position_decay": POSITION_DECAY,
            "device_effect": dict(zip(DEVICES, DEVICE_EFFECT, strict=True)),
            "device_share": dict(zip(DEVICES, DEVICE_SHARE, strict=True)),
            "t_ad_weights": T_AD_WEIGHTS,
            "t_pair_weights": T_PAIR_WEIGHTS,
            **(
                {"numeric_weights": dict(zip(params.numeric_names, params.numeric_weights, strict=True))}
                if params.numeric_features
                else {}
            ),
        },
        "world": world_info,
        "time": {"start": START.isoformat(), "days": DAYS},
        "realised": {
            "clicks": clicks,
            "impressions": params.impressions,
            "ctr": clicks / params.impressions,
            "mean_click_prob": moments.mean("click_prob"),
            "mean_logit": moments.mean("logit"),
        },
        "variance": {
            "logit": logit_var,
            "components": {name: moments.variance(name) for name in components(params)},
            "shares": {
                name: (moments.variance(name) / logit_var if logit_var > 0 else 0.0)
                for name in components(params)
            },
        },
        # Population values by construction: t_ad and t_pair are orthogonal, and t_pair has
        # zero mean within every ad, advertiser and query.
        "expected": {"text_variance_explained_by_ad_id": params.rho},
    }


def write_log(params: Params, out: Path, progress: bool = True) -> dict[str, Any]:
    """Generate the world and the rows; write all four files; return truth.json's content."""
    pools = load_pools(data_root())
    world = build_world(pools, params.rows, params.seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: {out.parent} cannot be created ({exc.strerror})") from None
    paths = _paths(out)
    names = (*components(params), "t_ad", "t_pair", "logit", "click_prob")
    moments = Moments(names)
    clicks = 0
    # Each file to a temporary name, renamed in reverse order of entry: the log goes last, so
    # once it exists, everything beside it is complete.
    with (
        atomic_path(paths["log"]) as log_file,
        atomic_path(paths["truth"]) as truth_file,
        atomic_path(paths["truth_json"]) as truth_json_file,
        atomic_path(paths["spec"]) as spec_file,
    ):
        # zstd, no statistics-dependent options: same inputs give the same bytes.
        with (
            pq.ParquetWriter(log_file, log_schema(params), compression="zstd") as log_writer,
            pq.ParquetWriter(truth_file, truth_schema(params), compression="zstd") as truth_writer,
        ):
            starts = range(0, params.rows, params.chunk_rows)
            for start in tqdm(starts, desc="simulate", unit="chunk", disable=None if progress else True):
                stop = min(start + params.chunk_rows, params.rows)
                log, truth = simulate_chunk(world, params, start, stop)
                log_writer.write_table(log, row_group_size=params.chunk_rows)
                truth_writer.write_table(truth, row_group_size=params.chunk_rows)
                label = "clicked" if params.impressions_per_row is None else "clicks"
                clicks += int(pc.sum(log.column(label).cast(pa.int64())).as_py())
                moments.add(truth)
                del log, truth
        truth = truth_record(params, world.info, paths, moments, clicks)
        truth_json_file.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        header = (
            "# Dataset spec written by `nlpctr data simulate`; prepare it with\n"
            f"#   nlpctr data prepare --dataset {paths['spec'].name} --out DIR\n"
        )
        spec_file.write_text(
            header + yaml.safe_dump(spec_for(out, params), sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
    return truth


# ------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nlpctr data simulate",
        description="Generate a sponsored-search click log whose text feature has a known redundancy.",
    )
    parser.add_argument("--rows", type=int, required=True, help="impressions to generate")
    parser.add_argument(
        "--redundancy",
        "--rho",
        dest="rho",
        type=float,
        required=True,
        help="share of the text effect the ad ID also knows, in [0, 1]",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--out", type=Path, required=True, help="the log file to write, *.parquet")
    parser.add_argument("--base-logit", type=float, default=-2.1, help="intercept of the click logit")
    parser.add_argument(
        "--text-strength", type=float, default=0.8, help="standard deviation of the text effect (logit units)"
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help="rows generated and written at a time (bounds memory; part of what the seed reproduces)",
    )
    parser.add_argument(
        "--impressions-per-row",
        type=int,
        default=None,
        help="aggregated rows: each row is shown N times, clicks ~ Binomial(N, p) "
        "(default: one binary impression per row)",
    )
    parser.add_argument(
        "--numeric-features",
        type=int,
        default=0,
        metavar="K",
        help="add K numeric columns numeric_1..numeric_K (right-skewed, >= 0) whose log1p has a known "
        "linear effect on the click logit (written to the truth; the spec maps them with log1p)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class SimulateRequest:
    """One `nlpctr data simulate` run: the log's size, redundancy and seed, and where it goes.

    Raises:
        UserError: a value out of range, or an output that is not a `.parquet` file's name.
    """

    rows: int
    rho: float  # the share of the text effect the ad ID also knows, in [0, 1]
    out: Path  # the log to write, *.parquet; its truth and spec are written beside it
    seed: int = 0
    base_logit: float = -2.1
    text_strength: float = 0.8  # the text effect's standard deviation, in logit units
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    impressions_per_row: int | None = None  # aggregated rows of N impressions (None: binary)
    numeric_features: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rows <= 0:
            raise UserError(f"--rows must be a positive number of impressions, got {self.rows}")
        if not (math.isfinite(self.rho) and 0.0 <= self.rho <= 1.0):
            raise UserError(f"--redundancy must be between 0 and 1, got {self.rho}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.chunk_rows <= 0:
            raise UserError(f"--chunk-rows must be positive, got {self.chunk_rows}")
        if self.impressions_per_row is not None and self.impressions_per_row < 1:
            raise UserError(f"--impressions-per-row must be >= 1, got {self.impressions_per_row}")
        if not (math.isfinite(self.text_strength) and self.text_strength >= 0):
            raise UserError(f"--text-strength must be a finite number >= 0, got {self.text_strength}")
        if not 0 <= self.numeric_features <= MAX_NUMERIC_FEATURES:
            raise UserError(
                f"--numeric-features must be between 0 and {MAX_NUMERIC_FEATURES}, "
                f"got {self.numeric_features}"
            )
        if not math.isfinite(self.base_logit):
            raise UserError(f"--base-logit must be finite, got {self.base_logit}")
        out = Path(self.out)
        if out.suffix != ".parquet" or out.name == ".parquet":
            raise UserError(f"--out must name a .parquet file (e.g. data/sim/log.parquet), got {self.out}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulateRequest:
        return cls(
            rows=args.rows,
            rho=args.rho,
            out=args.out,
            seed=args.seed,
            base_logit=args.base_logit,
            text_strength=args.text_strength,
            chunk_rows=args.chunk_rows,
            impressions_per_row=args.impressions_per_row,
            numeric_features=args.numeric_features,
            progress=not args.no_progress,
        )

    @property
    def params(self) -> Params:
        return Params(
            rows=self.rows,
            rho=float(self.rho),
            seed=self.seed,
            base=float(self.base_logit),
            text_strength=float(self.text_strength),
            chunk_rows=self.chunk_rows,
            impressions_per_row=self.impressions_per_row,
            numeric_features=self.numeric_features,
        )


@dataclass(frozen=True)
class SimulateSummary:
    """A simulated log: truth.json's content, the files written, and a one-line summary."""

    truth: dict[str, Any]  # <stem>.truth.json
    paths: dict[str, Path]  # log, truth, truth_json, spec
    wall_seconds: float
    summary: str

    def to_dict(self) -> dict[str, Any]:
        paths = {key: str(path) for key, path in self.paths.items()}
        return {**self.truth, "paths": paths, "wall_seconds": self.wall_seconds, "summary": self.summary}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """`nlpctr data simulate`: the flags as a `SimulateRequest` to `simulate`; returns truth.json's
    content plus the output paths and a summary."""
    return simulate(SimulateRequest.from_args(parse_args(argv))).to_dict()


def simulate(request: SimulateRequest) -> SimulateSummary:
    """Generate a simulated log with its truth and spec (DESIGN.md, "The simulator").

    Args:
        request: the log's size, redundancy, seed and output file.

    Returns:
        truth.json's content, the paths written and a one-line summary.

    Raises:
        UserError: the output is a folder, or files there that are not this command's earlier
            output (refused before anything is written), or a folder that cannot be created.
    """
    out = Path(request.out).expanduser().resolve()
    if out.is_dir():
        raise UserError(f"--out {request.out} is a folder; name the .parquet file to write")
    # The four files are replaced only when they are this job's own earlier output.
    claim_output_files(list(_paths(out).values()), "data simulate", is_simulated_log)
    params = request.params
    started = time.perf_counter()
    truth = write_log(params, out, progress=request.progress)
    wall = time.perf_counter() - started
    paths = _paths(out)
    world = truth["world"]
    per_row = f" x {params.impressions_per_row} impressions" if params.impressions_per_row else ""
    summary = (
        f"simulated {params.rows} rows{per_row} (rho={params.rho:g}, seed={params.seed}): "
        f"CTR {truth['realised']['ctr']:.4f}, {world['ads']} ads of {world['advertisers']} advertisers, "
        f"{world['queries']} queries; text = {truth['variance']['shares']['text_effect']:.0%} of logit "
        f"variance; {wall:.1f} s -> {out} (+ {paths['truth'].name}, {paths['truth_json'].name}, "
        f"{paths['spec'].name})"
    )
    return SimulateSummary(truth, paths, round(wall, 3), summary)
