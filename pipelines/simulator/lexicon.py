"""The simulator's texts: the real source pools, the fixed word classes and the text cues.

Texts are composed from the REAL texts under the data root: TREC 2013 queries and result
titles, ESCI shopping queries and product titles, Upworthy headlines (cleaned, deduped).
Every cue is a fixed word class, length or lexical overlap, so a language model can learn it
from the text alone; T_ad (an ad's own text effect) is a weighted sum of them.
"""

from __future__ import annotations

import csv
import html
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from nlpctr.errors import UserError
from nlpctr.pipelines.text_repair import fix_mojibake

TREC_FILE = Path("trec2013") / "trec2013_impressions.tsv"
ESCI_FILE = Path("esci_ubi") / "ubi_queries_events.ndjson"
UPWORTHY_FILE = Path("upworthy") / "upworthy_exploratory.parquet"

MAX_POOL_TEXT_CHARS = 250  # longer source texts are dropped: ads are short

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
