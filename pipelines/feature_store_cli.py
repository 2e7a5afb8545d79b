"""`nlpctr features ...`: the Feast store of a prepared dataset.

    nlpctr features apply --data DIR [--online sqlite|redis --redis-url HOST:PORT] [...]
    nlpctr features materialize --data DIR [--start ISO --end ISO | --incremental]
    nlpctr features get --data DIR --service NAME (--entity KEY=VALUE ... | --impression ID ...)

The CLI face of `features.store` (apply, materialize, online lookups). Usage in full:
docs/USAGE.md, "Feast store"; `get`'s key rules: docs/DESIGN.md, "Modules in detail",
feature_store_cli.py.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from nlpctr import prepared
from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.features.names import CASCADE_FROZEN
from nlpctr.features.store.request_time import ROLE_OF_ID
from nlpctr.features.store_config import DEFAULT_REDIS_URL, OFFLINE_STORES, ONLINE_STORES, StoreChoice
from nlpctr.layout import IMPRESSIONS

SUBCOMMANDS = ("apply", "materialize", "get")


def _timestamp(flag: str) -> Callable[[str], datetime]:
    """`flag`'s type: an ISO-8601 time. A bad one raises UserError, not argparse's error, so the
    CLI prints its one line (argparse's would be its usage and two more lines)."""

    def parse(text: str) -> datetime:
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            raise UserError(
                f"{flag}: {text[:40]!r} is not an ISO-8601 time; give one such as 2024-03-01 or "
                "2024-03-01T12:00:00 (naive = UTC)"
            ) from None

    return parse


def parser() -> argparse.ArgumentParser:
    """The `nlpctr features` parser with its three subcommands."""
    top = argparse.ArgumentParser(prog="nlpctr features", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")

    apply = sub.add_parser("apply", help="render DIR/feature_repo and register the views")
    apply.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    add_store_flags(apply)
    apply.add_argument(
        "--encoder",
        default=None,
        help="the embeddings `cascade_frozen` serves: a slug, or the encoder (package, folder) behind them",
    )

    mat = sub.add_parser("materialize", help="load the online views into the online store")
    mat.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    mat.add_argument(
        "--start", type=_timestamp("--start"), default=None, help="window start (ISO-8601; naive = UTC)"
    )
    mat.add_argument("--end", type=_timestamp("--end"), default=None, help="window end (default: now)")
    mat.add_argument("--incremental", action="store_true", help="from each view's last materialised end")

    get = sub.add_parser("get", help="online lookup of a feature service")
    get.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    get.add_argument("--service", default=CASCADE_FROZEN, help="feature service (default cascade_frozen)")
    get.add_argument(
        "--entity", action="append", default=[], metavar="KEY=VALUE", help="an entity key (repeatable)"
    )
    get.add_argument(
        "--impression",
        action="append",
        default=[],
        metavar="IMPRESSION_ID",
        help="look up the keys serving would send for this impression of DIR/impressions (repeatable); "
        "--entity then overrides them",
    )
    get.add_argument("--json", action="store_true", help="print the full result as JSON")
    return top


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """`--online`, `--redis-url`, `--offline`, `--spark-master`: a `StoreChoice` (`store_choice`);
    `features apply` and `experiment` take the same flags."""
    parser.add_argument("--online", choices=ONLINE_STORES, default="sqlite", help="online store")
    parser.add_argument("--redis-url", default=None, help=f"HOST:PORT (default {DEFAULT_REDIS_URL})")
    parser.add_argument(
        "--offline",
        choices=OFFLINE_STORES,
        default="duckdb",
        help="offline store: duckdb (default), spark (Feast's Spark store and compute engine), file",
    )
    parser.add_argument("--spark-master", default=None, help="Spark master URL (default local[*])")


def store_choice(args: argparse.Namespace) -> StoreChoice:
    """The stores the flags of `add_store_flags` chose (one line for a wrong combination)."""
    return StoreChoice(
        online=args.online, redis_url=args.redis_url, offline=args.offline, spark_master=args.spark_master
    )


def entity_rows(pairs: list[str]) -> list[dict[str, str]]:
    """`KEY=VALUE` pairs -> entity rows: the i-th value of each key forms row i."""
    values: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--entity takes KEY=VALUE, got {pair!r}")
        values.setdefault(key, []).append(value)
    if not values:
        raise UserError("give at least one --entity KEY=VALUE")
    n = max(len(v) for v in values.values())
    uneven = {k: len(v) for k, v in values.items() if len(v) not in (1, n)}
    if uneven:
        raise UserError(f"each --entity key must be given once or {n} times; got {uneven}")
    return [{k: v[i] if len(v) == n else v[0] for k, v in values.items()} for i in range(n)]


def impression_rows(data_dir: Path, impression_ids: list[str], keys: list[str]) -> list[dict[str, str]]:
    """The service's entity keys as they stand on the given impressions, in the order given."""
    table = ds.dataset(data_dir / IMPRESSIONS, format="parquet").to_table(
        columns=["impression_id", *keys], filter=pc.field("impression_id").isin(impression_ids)
    )
    found = {row["impression_id"]: row for row in table.to_pylist()}
    missing = [i for i in impression_ids if i not in found]
    if missing:
        raise UserError(f"--impression {missing[0]!r} is not in {data_dir / IMPRESSIONS}")
    return [{k: "" if found[i][k] is None else str(found[i][k]) for k in keys} for i in impression_ids]


def override(rows: list[dict[str, str]], given: list[dict[str, str]]) -> list[dict[str, str]]:
    """Impressions' keys with `--entity` values over them (one row of them for every impression,
    or one per impression); a text given for a role replaces that role's id."""
    if not given:
        return rows
    if len(given) not in (1, len(rows)):
        raise UserError(f"give each --entity once or once per --impression ({len(rows)}), not {len(given)}")
    out = []
    for i, row in enumerate(rows):
        extra = given[0] if len(given) == 1 else given[i]
        row = {k: v for k, v in row.items() if not (k in ROLE_OF_ID and ROLE_OF_ID[k] in extra)}
        out.append({**row, **extra})
    return out


def _show(value: Any) -> str:
    """One value, short enough for a terminal line (vectors are abbreviated)."""
    if isinstance(value, list):
        head = ", ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in value[:4])
        return f"[{len(value)} values: {head}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.6g}"
    return "null" if value is None else str(value)


def run(argv: list[str] | None = None) -> JsonObject:
    """`nlpctr features apply|materialize|get`; returns a dict whose `summary` the CLI prints."""
    args = parser().parse_args(argv)
    with prepared.reading(args.data, prepared.STORE_FOLDERS):  # a damaged file named, with its fix
        return _run(args)


def _run(args: argparse.Namespace) -> JsonObject:
    if args.command == "apply":
        return store.apply(args.data, store_choice(args), encoder=args.encoder)
    if args.command == "materialize":
        if args.incremental and (args.start or args.end):
            raise UserError("--incremental takes no --start/--end")
        if args.end is not None and args.start is None:
            raise UserError("--end goes with --start (or use --incremental)")
        return store.materialize(args.data, start=args.start, end=args.end, incremental=args.incremental)

    lookup = store.OnlineFeatures(args.data, args.service)
    given = entity_rows(args.entity) if args.entity or not args.impression else []  # (none: one line)
    unknown = sorted({k for row in given for k in row} - {*lookup.keys, *lookup.text_fields})
    if unknown:
        texts = f"; or a text for its id: {', '.join(lookup.text_fields)}" if lookup.text_fields else ""
        raise UserError(
            f"--entity {', '.join(unknown)}: not a key of service {args.service} "
            f"(its keys: {', '.join(lookup.keys)}{texts})"
        )
    if args.impression:
        rows = override(impression_rows(args.data.resolve(), args.impression, list(lookup.keys)), given)
    else:
        rows = given
    result = lookup.get(rows)
    out: JsonObject = {
        "service": args.service,
        "rows": result.rows,
        "features": result.feature_names,
        "null_counts": result.null_counts,
        "rows_with_nulls": result.rows_with_nulls,
        "computed": result.computed,  # vectors of unseen texts computed at lookup, per feature
        "values": result.to_records(),
    }
    if args.json:
        return out
    for i, record in enumerate(out["values"]):
        print(f"row {i}:")
        for name, value in record.items():
            print(f"  {name} = {_show(value)}")
    nulls = sum(result.null_counts.values())
    computed = sum(result.computed.values())
    out["summary"] = (
        f"{result.rows} row(s) x {len(result.feature_names)} features from {args.service}: "
        f"{nulls} null value(s), {result.rows_with_nulls} row(s) with an unknown key or missing feature"
        + (f"; {computed} vector(s) of unseen text computed at request time" if computed else "")
    )
    # The values were printed above; the summary line is what the CLI prints last.
    return {k: v for k, v in out.items() if k != "values"} | {"summary": out["summary"]}
