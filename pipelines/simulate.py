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
  effects, t_ad, t_pair, logit, click_prob, rho (components sum to the logit).
- <stem>.truth.json: rho, seed, rows, coefficients, entity counts, realised CTR, variance of
  each logit component and its share of the logit's variance.
- <stem>.spec.yaml: a dataset spec for `nlpctr data prepare --dataset <stem>.spec.yaml`.

Rows are generated and written in chunks (--chunk-rows), so memory stays bounded; the same
seed, rows and chunk size give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import html
import json
import math
import os
import random
import re
import time
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from nlpctr import __version__
from nlpctr.errors import UserError
from nlpctr.pipelines.ownership import claim_output_files, is_simulated_log
from nlpctr.pipelines.records import fix_mojibake
from nlpctr.pipelines.specs import data_root

# ------------------------------------------------------------------------------- constants

TREC_FILE = Path("trec2013") / "trec2013_impressions.tsv"
ESCI_FILE = Path("esci_ubi") / "ubi_queries_events.ndjson"
UPWORTHY_FILE = Path("upworthy") / "upworthy_exploratory.parquet"

MAX_POOL_TEXT_CHARS = 250  # longer source texts are dropped: ads are short
MAX_ADS, MAX_QUERIES, MAX_ADVERTISERS = 20_000, 50_000, 2_500
ROWS_PER_AD, ROWS_PER_QUERY, ADS_PER_ADVERTISER = 50, 20, 8
MATCHED_CANDIDATES, RANDOM_CANDIDATES = 6, 6
START = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
DAYS = 30
DEFAULT_CHUNK_ROWS = 200_000

# The click model's fixed coefficients (CLI flags set base and beta).
SD_AD, SD_ADVERTISER, SD_QUERY = 0.5, 0.5, 0.5
POSITION_SLOPE = -0.8  # pos(k) = POSITION_SLOPE * ln(k)
POSITION_DECAY = 0.75  # P(position = k) proportional to POSITION_DECAY ** (k - 1)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_SHARE = (0.55, 0.35, 0.10)
DEVICE_EFFECT = (-0.25, 0.0, -0.10)
# T_ad = sum of these weights over the cues an ad's text shows, minus a length penalty.
T_AD_WEIGHTS = {
    "number": 0.5,
    "superlative": 0.5,
    "deal": 0.5,
    "brand": 0.4,
    "you": 0.3,
    "question": -0.6,
    "length_penalty": -0.4,  # times |ln(words / 10)|: very short and very long ads do worse
}
T_PAIR_WEIGHTS = {
    "overlap": 1.5,  # share of the query's content words found in the ad
    "number_x_number": 0.7,
    "question_x_informative": 0.7,
    "question_x_deal": -0.4,
    "commercial_x_deal": 0.6,
    "brand_x_brand": 0.4,
}


def _lexicon(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Word classes: fixed lexicons, so the cues are learnable from text alone.
STOPWORDS = _lexicon(
    "a an the and or of to in on for with at by from is are was were be been it its this that "
    "these those as into about your you my our we he she they them his her their i me not no "
    "but if so do does did can will just than then there what which who how why when where "
    "vs com www http https"
)
SUPERLATIVES = _lexicon(
    "best top greatest ultimate most biggest perfect amazing incredible awesome favorite "
    "favourite fastest easiest cheapest largest leading finest"
)
DEAL_WORDS = _lexicon("free sale save deal deals discount cheap price prices shipping offer coupon")
YOU_WORDS = _lexicon("you your you're yours yourself")
INFORMATIVE_WORDS = _lexicon(
    "how why what guide tips ways learn explained facts history definition information info"
)
QUESTION_STARTS = _lexicon("how what why when where who which can does do is are should")
COMMERCIAL_WORDS = _lexicon(
    "buy cheap best price prices deals deal sale discount review reviews cheapest top"
)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’]*")
_WORD = re.compile(r"[a-z0-9]+")
# Brand-ish: all caps (USB, LG) or an inner capital (iPhone, OnePlus); plus a harvested lexicon.
_BRANDISH = re.compile(r"^(?:[A-Z]{2,}[0-9]*|[a-z]+[A-Z][A-Za-z0-9]*|[A-Z][a-z]+[A-Z][A-Za-z0-9]*)$")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Fragments an advertiser's house style adds to a real title.
AD_FRAGMENTS = {
    "number": ("Top 10 Picks", "Since 1998", "Over 500 Reviews", "3 Easy Steps", "24/7 Support",
               "2 Year Warranty", "5-Star Rated", "In 30 Minutes"),
    "superlative": ("Best", "The Ultimate", "Top-Rated", "Most Popular", "The Greatest", "Amazing"),
    "deal": ("Free Shipping", "Save Today", "Limited-Time Deal", "Discount Prices", "Buy Now, Save More",
             "On Sale"),
    "question": ("Want To Know More?", "Why Wait?", "Ready To Start?", "Looking For Answers?"),
    "you": ("Made For You", "Your Complete Guide", "You Will Love It", "See What You Missed"),
}  # fmt: skip
QUERY_MODIFIERS = {
    "commercial_prefix": ("best", "cheap", "buy"),
    "commercial_suffix": ("price", "deals", "reviews", "for sale", "discount"),
    "number_suffix": ("2024", "top 10", "under 50", "3 pack", "for 2"),
    "question_prefix": ("how to", "what is", "why", "where to buy"),
}
BRAND_SUFFIXES = (
    "Direct",
    "Shop",
    "Store",
    "Online",
    "Hub",
    "Co",
    "Works",
    "Labs",
    "Mart",
    "Depot",
    "Outlet",
    "Express",
)


# ------------------------------------------------------------------------------- text pools


@dataclass(frozen=True)
class Pools:
    """Cleaned, deduplicated, sorted real texts (sorted so draws do not depend on set order)."""

    queries: tuple[str, ...]
    titles: dict[str, tuple[str, ...]]  # source -> ad titles
    brands: tuple[str, ...]


def clean_text(value: Any) -> str | None:
    """A source text as one clean line, or None when it is empty, corrupt or too long."""
    if not isinstance(value, str):
        return None
    text = unicodedata.normalize("NFC", html.unescape(fix_mojibake(value)))
    text = " ".join(text.split())
    if len(text) < 3 or len(text) > MAX_POOL_TEXT_CHARS or _BAD_CHARS.search(text):
        return None
    return text


def _read_trec(path: Path) -> tuple[set[str], set[str]]:
    queries: set[str] = set()
    titles: set[str] = set()
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            for value, into in ((row.get("query"), queries), (row.get("title"), titles)):
                text = clean_text(value)
                if text:
                    into.add(text)
    return queries, titles


def _read_esci(path: Path) -> tuple[set[str], set[str]]:
    queries: set[str] = set()
    titles: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue  # a broken line costs one text, not the run
            if not isinstance(doc, dict):
                continue
            query = clean_text(doc.get("user_query"))
            if query:
                queries.add(query)
            attributes = doc.get("event_attributes")
            obj = attributes.get("object") if isinstance(attributes, dict) else None
            title = clean_text(obj.get("description")) if isinstance(obj, dict) else None
            if title:
                titles.add(title)
    return queries, titles


def _harvest_brands(product_titles: Iterable[str], all_texts: Iterable[str]) -> tuple[str, ...]:
    """Brand names: the capitalised first word of a product title that never occurs in lower
    case anywhere in the pools (so 'Portable' is out, 'Jabra' is in)."""
    lowercase_words = {t for text in all_texts for t in _TOKEN.findall(text) if t.islower()}
    brands = set()
    for title in product_titles:
        first = title.split(" ", 1)[0]
        if (
            first.isalpha()
            and len(first) >= 3
            and first[0].isupper()
            and first.lower() not in lowercase_words
        ):
            brands.add(first)
    return tuple(sorted(brands))


def load_pools(root: Path) -> Pools:
    """Read the three real sources once; UserError names a missing file."""
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist; set NLPCTR_DATA_ROOT to the folder holding the "
            "bundled datasets (trec2013/, esci_ubi/, upworthy/)"
        )
    for relative in (TREC_FILE, ESCI_FILE, UPWORTHY_FILE):
        if not (root / relative).is_file():
            raise UserError(
                f"{root / relative} is missing; the simulator composes its texts from the bundled "
                "datasets, so restore the file or point NLPCTR_DATA_ROOT at a complete data root"
            )
    trec_queries, trec_titles = _read_trec(root / TREC_FILE)
    esci_queries, esci_titles = _read_esci(root / ESCI_FILE)
    headlines_raw = pq.read_table(root / UPWORTHY_FILE, columns=["headline"]).column(0).to_pylist()
    headlines = {text for text in map(clean_text, headlines_raw) if text}
    queries = tuple(sorted(trec_queries | esci_queries))
    titles = {
        "trec2013": tuple(sorted(trec_titles)),
        "esci": tuple(sorted(esci_titles)),
        "upworthy": tuple(sorted(headlines)),
    }
    brands = _harvest_brands(titles["esci"], (*queries, *trec_titles, *esci_titles))
    if not queries or not all(titles.values()) or not brands:
        raise UserError(f"the datasets under {root} yielded no usable texts; check the files")
    return Pools(queries=queries, titles=titles, brands=brands)


# ------------------------------------------------------------------------------- text cues


def content_words(text: str) -> frozenset[str]:
    """Lower-cased non-stopword tokens, with a plural 's' dropped, for lexical overlap."""
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.add(word)
    return frozenset(words)


def text_cues(text: str, brands: frozenset[str]) -> dict[str, float]:
    """The word-class cues of one text (used for both ads and queries)."""
    tokens = _TOKEN.findall(text)
    distinct = set(tokens)
    lower = {t.lower() for t in distinct}
    first = tokens[0].lower() if tokens else ""
    has_question = "?" in text
    return {
        "number": float(any(ch.isdigit() for ch in text)),
        "superlative": float(not lower.isdisjoint(SUPERLATIVES)),
        "deal": float(not lower.isdisjoint(DEAL_WORDS) or "%" in text or "$" in text),
        "brand": float(not distinct.isdisjoint(brands) or any(map(_BRANDISH.match, distinct))),
        "you": float(not lower.isdisjoint(YOU_WORDS)),
        "question": float(has_question),
        "informative": float(has_question or not lower.isdisjoint(INFORMATIVE_WORDS)),
        "question_query": float(has_question or first in QUESTION_STARTS),
        "commercial": float(not lower.isdisjoint(COMMERCIAL_WORDS)),
        "words": float(len(tokens)),
    }


def t_ad_raw(cues: dict[str, np.ndarray]) -> np.ndarray:
    """Unstandardised T_ad from the ads' cue arrays."""
    w = T_AD_WEIGHTS
    length = np.abs(np.log(np.maximum(cues["words"], 1.0) / 10.0))
    return (
        w["number"] * cues["number"]
        + w["superlative"] * cues["superlative"]
        + w["deal"] * cues["deal"]
        + w["brand"] * cues["brand"]
        + w["you"] * cues["you"]
        + w["question"] * cues["question"]
        + w["length_penalty"] * length
    )


# ------------------------------------------------------------------------------- the world


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
    info: dict[str, Any]


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
        "t_pair": {
            "raw_sd": math.sqrt(raw_var),
            "centred_sd": t_pair_sd,
            "raw_variance_removed": 1.0 - (t_pair_sd**2 / raw_var if raw_var > 0 else 0.0),
            "centering_iterations": iterations,
            "centering_residual": residual / t_pair_sd if t_pair_sd > 0 else 0.0,
            "mean_overlap": float(np.average(overlap, weights=pair_weight)),
            "share_with_overlap": float(np.average(overlap > 0, weights=pair_weight)),
        },
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


# ------------------------------------------------------------------------------- rows

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
TRUTH_SCHEMA = pa.schema(
    [pa.field("impression_id", pa.string(), nullable=False)]
    + [pa.field(name, pa.float64(), nullable=False) for name in COMPONENTS]
    + [
        pa.field(name, pa.float64(), nullable=False)
        for name in ("t_ad", "t_pair", "logit", "click_prob", "rho")
    ]
)


@dataclass(frozen=True)
class Params:
    rows: int
    rho: float
    seed: int
    base: float
    text_strength: float
    chunk_rows: int
    impressions_per_row: int | None = None  # None: one binary impression per row

    @property
    def impressions(self) -> int:
        return self.rows * (self.impressions_per_row or 1)


def log_schema(params: Params) -> pa.Schema:
    return LOG_SCHEMA if params.impressions_per_row is None else AGGREGATED_LOG_SCHEMA


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
    components = {
        "base": np.full(n, params.base),
        "ad_effect": world.u_ad[ad],
        "advertiser_effect": world.u_advertiser[adv],
        "query_effect": world.u_query[query],
        "position_effect": POSITION_SLOPE * np.log(position),
        "device_effect": np.asarray(DEVICE_EFFECT)[device],
        "text_effect": params.text_strength
        * (math.sqrt(params.rho) * t_ad + math.sqrt(1.0 - params.rho) * t_pair),
    }
    logit = np.zeros(n)
    for name in COMPONENTS:
        logit += components[name]
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
            *labels,
        ],
        schema=log_schema(params),
    )
    truth_columns = [impression_id, *(pa.array(components[name]) for name in COMPONENTS)]
    truth_columns += [pa.array(t_ad), pa.array(t_pair), pa.array(logit), pa.array(prob)]
    truth_columns.append(pa.array(np.full(n, params.rho)))
    return log, pa.Table.from_arrays(truth_columns, schema=TRUTH_SCHEMA)


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


def simulate(params: Params, out: Path, progress: bool = True) -> dict[str, Any]:
    """Generate the world and the rows; write all four files; return truth.json's content."""
    pools = load_pools(data_root())
    world = build_world(pools, params.rows, params.seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: {out.parent} cannot be created ({exc.strerror})") from None
    paths = _paths(out)
    tag = uuid.uuid4().hex[:8]
    temp = {key: path.with_name(f".{path.name}.tmp-{tag}") for key, path in paths.items()}
    names = (*COMPONENTS, "t_ad", "t_pair", "logit", "click_prob")
    moments = Moments(names)
    clicks = 0
    try:
        # zstd, no statistics-dependent options: same inputs give the same bytes.
        with (
            pq.ParquetWriter(temp["log"], log_schema(params), compression="zstd") as log_writer,
            pq.ParquetWriter(temp["truth"], TRUTH_SCHEMA, compression="zstd") as truth_writer,
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
        logit_var = moments.variance("logit")
        truth = {
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
                "logit": "base + ad_effect + advertiser_effect + query_effect + position_effect "
                "+ device_effect + text_effect",
                "text_effect": "text_strength * (sqrt(rho) * t_ad + sqrt(1 - rho) * t_pair)",
                "click": (
                    "Bernoulli(sigmoid(logit))"
                    if params.impressions_per_row is None
                    else f"clicks ~ Binomial({params.impressions_per_row}, sigmoid(logit)) per row"
                ),
                "t_ad": "standardised sum of t_ad_weights over the ad text's cues (ad text only)",
                "t_pair": "standardised, double-centred (zero mean within every ad and query) sum of "
                "t_pair_weights over query-ad overlap and word-class agreement",
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
            },
            "world": world.info,
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
                "components": {name: moments.variance(name) for name in COMPONENTS},
                "shares": {
                    name: (moments.variance(name) / logit_var if logit_var > 0 else 0.0)
                    for name in COMPONENTS
                },
            },
            # Population values by construction: t_ad and t_pair are orthogonal, and t_pair has
            # zero mean within every ad, advertiser and query.
            "expected": {"text_variance_explained_by_ad_id": params.rho},
        }
        temp["truth_json"].write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        header = (
            "# Dataset spec written by `nlpctr data simulate`; prepare it with\n"
            f"#   nlpctr data prepare --dataset {paths['spec'].name} --out DIR\n"
        )
        temp["spec"].write_text(
            header + yaml.safe_dump(spec_for(out, params), sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )
        # The log goes last: once it exists, everything beside it is complete.
        for key in ("truth", "truth_json", "spec", "log"):
            os.replace(temp[key], paths[key])
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _validate(args: argparse.Namespace) -> tuple[Params, Path]:
    if args.rows <= 0:
        raise UserError(f"--rows must be a positive number of impressions, got {args.rows}")
    if not (math.isfinite(args.rho) and 0.0 <= args.rho <= 1.0):
        raise UserError(f"--redundancy must be between 0 and 1, got {args.rho}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.chunk_rows <= 0:
        raise UserError(f"--chunk-rows must be positive, got {args.chunk_rows}")
    if args.impressions_per_row is not None and args.impressions_per_row < 1:
        raise UserError(f"--impressions-per-row must be >= 1, got {args.impressions_per_row}")
    if not (math.isfinite(args.text_strength) and args.text_strength >= 0):
        raise UserError(f"--text-strength must be a finite number >= 0, got {args.text_strength}")
    if not math.isfinite(args.base_logit):
        raise UserError(f"--base-logit must be finite, got {args.base_logit}")
    out: Path = args.out.expanduser().resolve()
    if out.suffix != ".parquet" or out.name == ".parquet":
        raise UserError(f"--out must name a .parquet file (e.g. data/sim/log.parquet), got {args.out}")
    if out.is_dir():
        raise UserError(f"--out {args.out} is a folder; name the .parquet file to write")
    # The four files are replaced only when they are this job's own earlier output.
    claim_output_files(list(_paths(out).values()), "data simulate", is_simulated_log)
    params = Params(
        rows=args.rows,
        rho=float(args.rho),
        seed=args.seed,
        base=float(args.base_logit),
        text_strength=float(args.text_strength),
        chunk_rows=args.chunk_rows,
        impressions_per_row=args.impressions_per_row,
    )
    return params, out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the simulator; returns truth.json's content plus the output paths and a summary."""
    args = parse_args(argv)
    params, out = _validate(args)
    started = time.perf_counter()
    truth = simulate(params, out, progress=not args.no_progress)
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
    return {
        **truth,
        "paths": {key: str(path) for key, path in paths.items()},
        "wall_seconds": round(wall, 3),
        "summary": summary,
    }
