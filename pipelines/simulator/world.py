"""The simulator's world: advertisers, ads, queries, the auction graph and entity effects.

Sized from --rows (capped) and kept in memory. Advertisers have a brand and a house style; an
ad is a real title plus its advertiser's fragments; a query is a real query, sometimes with
modifiers. Each query has up to 12 eligible ads, about half sharing a content word with it.
T_pair (the query-ad text effect) is double-centred over the auction graph, so that no ID
can know it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from nlpctr.atomic import JsonObject
from nlpctr.pipelines.simulator.lexicon import (
    AD_FRAGMENTS,
    BRAND_SUFFIXES,
    QUERY_MODIFIERS,
    Pools,
    content_words,
    t_ad_raw,
    text_cues,
)

# Entity counts grow with --rows up to these caps.
MAX_ADS, MAX_QUERIES, MAX_ADVERTISERS = 20_000, 50_000, 2_500
ROWS_PER_AD, ROWS_PER_QUERY, ADS_PER_ADVERTISER = 50, 20, 8
MATCHED_CANDIDATES, RANDOM_CANDIDATES = 6, 6

# Standard deviations of the per-entity random effects in the click logit.
SD_AD, SD_ADVERTISER, SD_QUERY = 0.5, 0.5, 0.5
# T_pair = sum of these weights over the pair's overlap and word-class agreements, then
# double-centred and standardised.
T_PAIR_WEIGHTS = {
    "overlap": 1.5,  # share of the query's content words found in the ad
    "number_x_number": 0.7,
    "question_x_informative": 0.7,
    "question_x_deal": -0.4,
    "commercial_x_deal": 0.6,
    "brand_x_brand": 0.4,
}


@dataclass(frozen=True)
class World:
    """Every entity and the auction graph; small (sized from --rows, capped)."""

    ad_text: pa.Array
    ad_id: pa.Array
    ad_advertiser: np.ndarray  # advertiser index of each ad
    advertiser_id: pa.Array
    query_text: pa.Array
    query_id: pa.Array
    query_cum: np.ndarray  # cumulative P(query), for sampling
    pair_offset: np.ndarray  # candidates of query q: pair rows offset[q] .. offset[q] + count[q]
    pair_count: np.ndarray
    pair_ad: np.ndarray
    t_ad: np.ndarray  # standardised, per ad
    t_pair: np.ndarray  # standardised and double-centred, per pair
    u_ad: np.ndarray
    u_advertiser: np.ndarray
    u_query: np.ndarray
    info: JsonObject


def entity_counts(rows: int) -> tuple[int, int, int]:
    """(ads, advertisers, queries) for a log of `rows` impressions."""
    ads = int(np.clip(rows // ROWS_PER_AD, 20, MAX_ADS))
    advertisers = int(np.clip(ads // ADS_PER_ADVERTISER, 4, MAX_ADVERTISERS))
    queries = int(np.clip(rows // ROWS_PER_QUERY, 20, MAX_QUERIES))
    return ads, advertisers, queries


def _compose_ads(
    rnd: random.Random, pools: Pools, n_ads: int, n_adv: int
) -> tuple[list[str], np.ndarray, list[str]]:
    """Ad texts, each ad's advertiser and each advertiser's brand."""
    sources = sorted(pools.titles)
    sizes = [len(pools.titles[s]) for s in sources]
    brands = list(pools.brands)
    rnd.shuffle(brands)
    # Unique brand names: harvested brands first, then with a suffix (JabraDirect), then numbered.
    adv_brand = []
    for i in range(n_adv):
        round_, brand = divmod(i, len(brands))
        suffix = "" if round_ == 0 else BRAND_SUFFIXES[(round_ - 1) % len(BRAND_SUFFIXES)]
        number = "" if round_ <= len(BRAND_SUFFIXES) else str((round_ - 1) // len(BRAND_SUFFIXES))
        adv_brand.append(f"{brands[brand]}{suffix}{number}")
    adv_source = [rnd.choices(sources, weights=sizes)[0] for _ in range(n_adv)]
    # House style: each advertiser's own rate for every fragment class (Beta, mostly low).
    adv_style = [{k: rnd.betavariate(0.7, 2.5) for k in (*AD_FRAGMENTS, "brand")} for _ in range(n_adv)]
    # Every advertiser gets an ad; the rest follow a Zipf-like advertiser size.
    adv_weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n_adv)]
    ad_adv = list(range(min(n_adv, n_ads))) + rnd.choices(range(n_adv), adv_weights, k=max(0, n_ads - n_adv))
    rnd.shuffle(ad_adv)
    # Titles are dealt from each source's shuffled deck, so repeats start only when it runs out.
    decks = {s: rnd.sample(pools.titles[s], len(pools.titles[s])) for s in sources}
    dealt = dict.fromkeys(sources, 0)
    texts = []
    for adv in ad_adv:
        source, style = adv_source[adv], adv_style[adv]
        deck = decks[source]
        title = deck[dealt[source] % len(deck)]
        dealt[source] += 1
        if rnd.random() < style["superlative"]:
            title = f"{rnd.choice(AD_FRAGMENTS['superlative'])} {title}"
        tails = [
            rnd.choice(AD_FRAGMENTS[k])
            for k in ("number", "deal", "you", "question")
            if rnd.random() < style[k]
        ]
        text = " - ".join([title, *tails])
        if rnd.random() < style["brand"]:
            text = f"{text} | {adv_brand[adv]}"
        texts.append(text)
    return texts, np.asarray(ad_adv, dtype=np.int64), adv_brand


def _compose_queries(rnd: random.Random, pools: Pools, n_queries: int, brands: list[str]) -> list[str]:
    """Query texts: real queries with modifiers; distinct where the modifiers allow it."""
    deck = rnd.sample(pools.queries, len(pools.queries))
    used: set[str] = set()
    texts = []
    for i in range(n_queries):
        base = deck[i % len(deck)]
        text = base
        for attempt in range(30):
            words = [base]
            # The first use of a base query is the plain query; later ones draw modifiers.
            if attempt or i >= len(deck):
                if rnd.random() < 0.15:
                    words.insert(0, rnd.choice(QUERY_MODIFIERS["question_prefix"]))
                if rnd.random() < 0.2:
                    pick = rnd.choice(("commercial_prefix", "commercial_suffix"))
                    modifier = rnd.choice(QUERY_MODIFIERS[pick])
                    words.insert(0 if pick.endswith("prefix") else len(words), modifier)
                if rnd.random() < 0.15:
                    words.append(rnd.choice(QUERY_MODIFIERS["number_suffix"]))
                if rnd.random() < 0.1:
                    words.append(rnd.choice(brands))
                if rnd.random() < 0.05:
                    words.append("?")
            text = " ".join(words).replace(" ?", "?")
            if text not in used:
                break
        used.add(text)
        texts.append(text)
    return texts


def _candidates(
    rnd: random.Random, query_words: list[frozenset[str]], ad_words: list[frozenset[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's eligible ads: some sharing a content word with it, the rest random.
    Returns (offset, flat ad indices) in query order."""
    n_ads = len(ad_words)
    postings: dict[str, list[int]] = {}
    for ad, words in enumerate(ad_words):
        for word in sorted(words):
            postings.setdefault(word, []).append(ad)
    # Random slots come from a shuffled repeat of all ads, so every ad is eligible somewhere.
    filler: list[int] = []
    flat: list[int] = []
    offset = [0]
    for words in query_words:
        chosen: dict[int, None] = {}
        lists = [postings[w] for w in sorted(words) if w in postings]
        tries = 0
        while lists and len(chosen) < MATCHED_CANDIDATES and tries < 4 * MATCHED_CANDIDATES:
            chosen[rnd.choice(rnd.choice(lists))] = None
            tries += 1
        target = min(len(chosen) + RANDOM_CANDIDATES, MATCHED_CANDIDATES + RANDOM_CANDIDATES, n_ads)
        while len(chosen) < target:
            if not filler:
                filler = rnd.sample(range(n_ads), n_ads)
            chosen[filler.pop()] = None
        flat.extend(chosen)
        offset.append(len(flat))
    return np.asarray(offset, dtype=np.int64), np.asarray(flat, dtype=np.int64)


def _double_centre(
    values: np.ndarray, weights: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int
) -> tuple[np.ndarray, int, float]:
    """Remove the weighted row and column means by backfitting (alternating projections) until
    both are ~0, so that no query or ad ID can absorb any of it.

    Returns (centred values, iterations, largest remaining query mean: the ad means are exactly
    0 after each sweep)."""
    out = values - np.average(values, weights=weights)
    # 1e-9 of the signal's spread is far below anything a model could pick up.
    tolerance = 1e-9 * max(float(np.sqrt(np.average(out**2, weights=weights))), 1e-12)
    row_w = np.where((w := np.bincount(rows, weights, n_rows)) > 0, w, 1.0)
    col_w = np.where((w := np.bincount(cols, weights, n_cols)) > 0, w, 1.0)
    residual = math.inf
    iteration = 0
    while iteration < 2000:
        iteration += 1
        row_mean = np.bincount(rows, weights * out, n_rows) / row_w
        # Column means are exactly 0 after the previous step; row means measure what is left.
        residual = float(np.abs(row_mean).max())
        if residual < tolerance:
            break
        out -= row_mean[rows]
        col_mean = np.bincount(cols, weights * out, n_cols) / col_w
        out -= col_mean[cols]
    return out, iteration, residual


def _standardise(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    mean = float(np.average(values, weights=weights))
    sd = float(np.sqrt(np.average((values - mean) ** 2, weights=weights)))
    # A degenerate world (all cues equal) has no text signal: keep it at 0 instead of NaN.
    return ((values - mean) / sd if sd > 0 else np.zeros_like(values)), mean, sd


def _pair_effect(
    query_words: list[frozenset[str]],
    ad_words: list[frozenset[str]],
    query_cues: dict[str, np.ndarray],
    ad_cues: dict[str, np.ndarray],
    pair_query: np.ndarray,
    pair_ad: np.ndarray,
    pair_weight: np.ndarray,
) -> tuple[np.ndarray, dict[str, float]]:
    """The pair-level text effect t_pair of each candidate pair: word overlap and cue agreement,
    double-centred (no query or ad ID can absorb it) and standardised; with what the centring
    removed, for the world's info."""
    n_queries, n_ads = len(query_words), len(ad_words)
    ad_weight = np.bincount(pair_ad, pair_weight, n_ads)
    overlap = np.fromiter(
        (
            len(query_words[q] & ad_words[a]) / len(query_words[q]) if query_words[q] else 0.0
            for q, a in zip(pair_query.tolist(), pair_ad.tolist(), strict=True)
        ),
        dtype=np.float64,
        count=len(pair_ad),
    )
    # Agreement terms multiply cues centred on their impression-weighted means, so that each
    # term is mostly pair-level to begin with (little for the centering below to remove).
    query_weight = np.bincount(pair_query, pair_weight, n_queries)

    def centred_cue(cues: dict[str, np.ndarray], key: str, weight: np.ndarray) -> np.ndarray:
        return cues[key] - np.average(cues[key], weights=weight)

    qc = {
        k: centred_cue(query_cues, k, query_weight)[pair_query]
        for k in ("number", "question_query", "commercial", "brand")
    }
    ac = {k: centred_cue(ad_cues, k, ad_weight)[pair_ad] for k in ("number", "informative", "deal", "brand")}
    w = T_PAIR_WEIGHTS
    pair_raw = (
        w["overlap"] * overlap
        + w["number_x_number"] * qc["number"] * ac["number"]
        + w["question_x_informative"] * qc["question_query"] * ac["informative"]
        + w["question_x_deal"] * qc["question_query"] * ac["deal"]
        + w["commercial_x_deal"] * qc["commercial"] * ac["deal"]
        + w["brand_x_brand"] * qc["brand"] * ac["brand"]
    )
    raw_var = float(
        np.average((pair_raw - np.average(pair_raw, weights=pair_weight)) ** 2, weights=pair_weight)
    )
    centred, iterations, residual = _double_centre(
        pair_raw, pair_weight, pair_query, pair_ad, n_queries, n_ads
    )
    t_pair, _, t_pair_sd = _standardise(centred, pair_weight)

    return t_pair, {
        "raw_sd": math.sqrt(raw_var),
        "centred_sd": t_pair_sd,
        "raw_variance_removed": 1.0 - (t_pair_sd**2 / raw_var if raw_var > 0 else 0.0),
        "centering_iterations": iterations,
        "centering_residual": residual / t_pair_sd if t_pair_sd > 0 else 0.0,
        "mean_overlap": float(np.average(overlap, weights=pair_weight)),
        "share_with_overlap": float(np.average(overlap > 0, weights=pair_weight)),
    }


def build_world(pools: Pools, rows: int, seed: int) -> World:
    """Entities, texts, the auction graph and the entity-level effects, from the seed."""
    n_ads, n_adv, n_queries = entity_counts(rows)
    rnd = random.Random(f"nlpctr-simulate:{seed}")  # str seeds hash with sha512: stable across runs
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))

    ad_texts, ad_adv, adv_brands = _compose_ads(rnd, pools, n_ads, n_adv)
    query_texts = _compose_queries(rnd, pools, n_queries, adv_brands)
    brand_set = frozenset(pools.brands) | frozenset(adv_brands)

    ad_words = [content_words(t) for t in ad_texts]
    query_words = [content_words(t) for t in query_texts]
    offset, pair_ad = _candidates(rnd, query_words, ad_words)
    count = np.diff(offset)
    pair_query = np.repeat(np.arange(n_queries), count)

    # P(query): Zipf-like over a random order of the queries.
    rank = rng.permutation(n_queries)
    p_query = 1.0 / (rank + 10.0)
    p_query /= p_query.sum()
    pair_weight = p_query[pair_query] / count[pair_query]

    ad_cues = _cue_arrays([text_cues(t, brand_set) for t in ad_texts])
    query_cues = _cue_arrays([text_cues(t, brand_set) for t in query_texts])
    ad_weight = np.bincount(pair_ad, pair_weight, n_ads)
    t_ad, t_ad_mean, t_ad_sd = _standardise(t_ad_raw(ad_cues), ad_weight)

    t_pair, t_pair_info = _pair_effect(
        query_words, ad_words, query_cues, ad_cues, pair_query, pair_ad, pair_weight
    )

    u_ad = rng.normal(0.0, SD_AD, n_ads)
    u_adv = rng.normal(0.0, SD_ADVERTISER, n_adv)
    u_query = rng.normal(0.0, SD_QUERY, n_queries)
    cum = np.cumsum(p_query)
    cum /= cum[-1]

    info = {
        "ads": n_ads,
        "advertisers": n_adv,
        "queries": n_queries,
        "distinct_ad_texts": len(set(ad_texts)),
        "distinct_query_texts": len(set(query_texts)),
        "candidate_pairs": len(pair_ad),
        "pools": {
            "queries": len(pools.queries),
            **{f"titles_{k}": len(v) for k, v in pools.titles.items()},
            "brands": len(pools.brands),
        },
        "t_ad": {"raw_mean": t_ad_mean, "raw_sd": t_ad_sd},
        "t_pair": t_pair_info,
    }
    return World(
        ad_text=pa.array(ad_texts, pa.string()),
        ad_id=pa.array([f"ad{i:06d}" for i in range(n_ads)], pa.string()),
        ad_advertiser=ad_adv,
        advertiser_id=pa.array([f"adv{i:05d}" for i in range(n_adv)], pa.string()),
        query_text=pa.array(query_texts, pa.string()),
        query_id=pa.array([f"q{i:06d}" for i in range(n_queries)], pa.string()),
        query_cum=cum,
        pair_offset=offset[:-1],
        pair_count=count,
        pair_ad=pair_ad,
        t_ad=t_ad,
        t_pair=t_pair,
        u_ad=u_ad,
        u_advertiser=u_adv,
        u_query=u_query,
        info=info,
    )


def _cue_arrays(cues: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {key: np.array([c[key] for c in cues], dtype=np.float64) for key in cues[0]}
