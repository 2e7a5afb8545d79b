"""The simulator's rows: impressions drawn from the world, and their clicks.

    logit = base + u_ad + u_advertiser + u_query + pos(position) + dev(device) + text [+ numeric]
    text  = beta * (sqrt(rho) * T_ad + sqrt(1 - rho) * T_pair)
    numeric = sum_k w_k * (log1p(numeric_k) - NUMERIC_LOG_MEAN)   (with --numeric-features K)

Each chunk of rows has its own RNG stream (seed, chunk start), so the same seed, rows and chunk
size give the same rows; the ground truth of every row comes out beside it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nlpctr.pipelines.simulator.world import World

# The log spans DAYS days from START.
START = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
DAYS = 30

# The click model's fixed coefficients (CLI flags set base and beta).
POSITION_SLOPE = -0.8  # pos(k) = POSITION_SLOPE * ln(k)
POSITION_DECAY = 0.75  # P(position = k) proportional to POSITION_DECAY ** (k - 1)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_SHARE = (0.55, 0.35, 0.10)
DEVICE_EFFECT = (-0.25, 0.0, -0.10)

LOG_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_text", pa.string(), nullable=False),
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("ad_text", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("clicked", pa.int8(), nullable=False),
    ]
)
# --impressions-per-row: the same rows with aggregated labels instead of `clicked`.
AGGREGATED_LOG_SCHEMA = pa.schema(
    [
        *(LOG_SCHEMA.field(i) for i in range(len(LOG_SCHEMA) - 1)),
        pa.field("impressions", pa.int64(), nullable=False),
        pa.field("clicks", pa.int64(), nullable=False),
    ]
)
COMPONENTS = ("base", "ad_effect", "advertiser_effect", "query_effect", "position_effect",
              "device_effect", "text_effect")  # fmt: skip
NUMERIC_EFFECT = "numeric_effect"  # a component only with --numeric-features K > 0
TRUTH_SCHEMA = pa.schema(
    [pa.field("impression_id", pa.string(), nullable=False)]
    + [pa.field(name, pa.float64(), nullable=False) for name in COMPONENTS]
    + [
        pa.field(name, pa.float64(), nullable=False)
        for name in ("t_ad", "t_pair", "logit", "click_prob", "rho")
    ]
)
# Numeric features (--numeric-features K): numeric_k = expm1(NUMERIC_LOG_MEAN + z), z ~ N(0, 1)
# clipped at -NUMERIC_LOG_MEAN so the value is >= 0 (a count- or price-like, right-skewed column);
# its effect on the logit is linear in log1p(numeric_k), with weight NUMERIC_WEIGHT_FIRST *
# NUMERIC_WEIGHT_RATIO ** (k - 1). Drawn per row from their own stream: independent of every
# entity, and the other columns are the same with or without them.
NUMERIC_LOG_MEAN = 2.0
NUMERIC_WEIGHT_FIRST = 0.5
NUMERIC_WEIGHT_RATIO = -0.6
MAX_NUMERIC_FEATURES = 8


@dataclass(frozen=True)
class Params:
    rows: int
    rho: float
    seed: int
    base: float
    text_strength: float
    chunk_rows: int
    impressions_per_row: int | None = None  # None: one binary impression per row
    numeric_features: int = 0  # K numeric columns numeric_1..numeric_K with a known effect

    @property
    def impressions(self) -> int:
        return self.rows * (self.impressions_per_row or 1)

    @property
    def numeric_names(self) -> tuple[str, ...]:
        return tuple(f"numeric_{k + 1}" for k in range(self.numeric_features))

    @property
    def numeric_weights(self) -> tuple[float, ...]:
        return tuple(NUMERIC_WEIGHT_FIRST * NUMERIC_WEIGHT_RATIO**k for k in range(self.numeric_features))


def components(params: Params) -> tuple[str, ...]:
    """The logit's components: COMPONENTS, and the numeric effect when there are numeric features."""
    return (*COMPONENTS, NUMERIC_EFFECT) if params.numeric_features else COMPONENTS


def log_schema(params: Params) -> pa.Schema:
    """The log's columns: the numeric features (if any) go before the labels."""
    schema = LOG_SCHEMA if params.impressions_per_row is None else AGGREGATED_LOG_SCHEMA
    labels = 1 if params.impressions_per_row is None else 2
    numeric = [pa.field(name, pa.float64(), nullable=False) for name in params.numeric_names]
    fields = list(schema)
    return pa.schema([*fields[:-labels], *numeric, *fields[-labels:]])


def truth_schema(params: Params) -> pa.Schema:
    """TRUTH_SCHEMA, with the numeric effect after the other components when there is one."""
    if not params.numeric_features:
        return TRUTH_SCHEMA
    fields = list(TRUTH_SCHEMA)
    at = 1 + len(COMPONENTS)
    return pa.schema([*fields[:at], pa.field(NUMERIC_EFFECT, pa.float64(), nullable=False), *fields[at:]])


def numeric_columns(params: Params, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows' numeric features (n x K, each >= 0) and their effect on the logit, from the chunk's
    own stream (seed, 3, start)."""
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, 3, start]))
    z = np.maximum(rng.standard_normal((n, params.numeric_features)), -NUMERIC_LOG_MEAN)
    values = np.expm1(NUMERIC_LOG_MEAN + z)
    effect = (np.log1p(values) - NUMERIC_LOG_MEAN) @ np.asarray(params.numeric_weights)
    return values, effect


def simulate_chunk(world: World, params: Params, start: int, stop: int) -> tuple[pa.Table, pa.Table]:
    """Rows start..stop-1 of the log and of the ground truth (own RNG stream per chunk)."""
    n = stop - start
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, 2, start]))
    query = np.searchsorted(world.query_cum, rng.random(n), side="right").clip(0, len(world.query_cum) - 1)
    pair = world.pair_offset[query] + (rng.random(n) * world.pair_count[query]).astype(np.int64)
    ad = world.pair_ad[pair]
    adv = world.ad_advertiser[ad]
    position_p = POSITION_DECAY ** np.arange(10)
    position = rng.choice(10, n, p=position_p / position_p.sum()) + 1
    device = rng.choice(len(DEVICES), n, p=DEVICE_SHARE)
    # Time runs forward chunk by chunk (each chunk owns its slice of the 30 days), sorted within.
    span_ms = DAYS * 86_400_000
    lo = start * span_ms // params.rows
    hi = stop * span_ms // params.rows
    start_ms = int(START.timestamp() * 1000)
    stamps = np.sort(rng.integers(lo, max(hi, lo + 1), n)) + start_ms

    t_ad, t_pair = world.t_ad[ad], world.t_pair[pair]
    parts = {
        "base": np.full(n, params.base),
        "ad_effect": world.u_ad[ad],
        "advertiser_effect": world.u_advertiser[adv],
        "query_effect": world.u_query[query],
        "position_effect": POSITION_SLOPE * np.log(position),
        "device_effect": np.asarray(DEVICE_EFFECT)[device],
        "text_effect": params.text_strength
        * (math.sqrt(params.rho) * t_ad + math.sqrt(1.0 - params.rho) * t_pair),
    }
    numeric = np.zeros((n, 0))
    if params.numeric_features:
        numeric, parts[NUMERIC_EFFECT] = numeric_columns(params, start, n)
    logit = np.zeros(n)
    for name in components(params):
        logit += parts[name]
    prob = 1.0 / (1.0 + np.exp(-logit))
    if params.impressions_per_row is None:
        labels = [pa.array((rng.random(n) < prob).astype(np.int8), pa.int8())]
    else:
        clicks = rng.binomial(params.impressions_per_row, prob).astype(np.int64)
        labels = [pa.array(np.full(n, params.impressions_per_row, np.int64)), pa.array(clicks)]

    digits = pc.utf8_lpad(pa.array(np.arange(start, stop), pa.int64()).cast(pa.string()), 10, "0")
    impression_id = pc.binary_join_element_wise("imp", digits, "")
    log = pa.Table.from_arrays(
        [
            impression_id,
            pa.array(stamps, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            world.query_id.take(query),
            world.query_text.take(query),
            world.ad_id.take(ad),
            world.ad_text.take(ad),
            world.advertiser_id.take(adv),
            pa.array(position, pa.int32()),
            pa.array(np.asarray(DEVICES, dtype=object)[device], pa.string()),
            *(pa.array(numeric[:, k]) for k in range(params.numeric_features)),
            *labels,
        ],
        schema=log_schema(params),
    )
    truth_columns = [impression_id, *(pa.array(parts[name]) for name in components(params))]
    truth_columns += [pa.array(t_ad), pa.array(t_pair), pa.array(logit), pa.array(prob)]
    truth_columns.append(pa.array(np.full(n, params.rho)))
    return log, pa.Table.from_arrays(truth_columns, schema=truth_schema(params))


class Moments:
    """Mean and variance of each logit component over all rows, merged chunk by chunk (Chan et
    al.'s pairwise update: exact for constant columns, stable for millions of rows; the chunk
    order is fixed, so truth.json is reproducible)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self.n = 0
        self.means = dict.fromkeys(self.names, 0.0)
        self.m2 = dict.fromkeys(self.names, 0.0)  # sum of squared deviations from the mean

    def add(self, table: pa.Table) -> None:
        n_b = table.num_rows
        if n_b == 0:
            return
        total = self.n + n_b
        for name in self.names:
            values = table.column(name).to_numpy()
            mean_b = float(values.mean())
            m2_b = float(np.square(values - mean_b).sum())
            delta = mean_b - self.means[name]
            self.means[name] += delta * n_b / total
            self.m2[name] += m2_b + delta * delta * self.n * n_b / total
        self.n = total

    def mean(self, name: str) -> float:
        return self.means[name]

    def variance(self, name: str) -> float:
        return self.m2[name] / self.n if self.n else 0.0
