"""OpenSearch UBI bulk NDJSON (queries + events) as impression records.

The bulk file alternates `{"index": ...}` action lines with documents. Each document is
classified on its own, so the file can be split across workers at any line:
- `ubi_queries` documents (user_query, no action_name) give a query's text;
- `impression` events give one record each (the rows of the dataset);
- `click` events set clicked = 1 on the impression with the same (query_id, object_id);
- any event whose object carries a description names that object's title.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nlpctr.atomic import JsonObject
from nlpctr.pipelines.records import MALFORMED_KEY
from nlpctr.pipelines.source_files import parse_json_line

QUERY = "query"
IMPRESSION = "impression"
CLICK = "click"
TITLE = "title"
MALFORMED = "malformed"
OTHER_EVENT = "other_event"


def _object(doc: JsonObject) -> JsonObject:
    attributes = doc.get("event_attributes")
    if not isinstance(attributes, dict):
        return {}
    obj = attributes.get("object")
    return obj if isinstance(obj, dict) else {}


def _ordinal(doc: JsonObject) -> Any:
    attributes = doc.get("event_attributes")
    position = attributes.get("position") if isinstance(attributes, dict) else None
    return position.get("ordinal") if isinstance(position, dict) else None


def classify_line(line: bytes | str) -> list[tuple[str, Any, Any]]:
    """(tag, key, value) items of one line; action lines and blank lines give none."""
    doc = parse_json_line(line)
    if doc is None:
        return []
    if MALFORMED_KEY in doc:
        return [(MALFORMED, None, doc)]
    if set(doc) <= {"index", "create"}:
        return []
    action = doc.get("action_name")
    if action is None:
        if "user_query" in doc and doc.get("query_id"):
            return [(QUERY, str(doc["query_id"]), doc.get("user_query"))]
        return [(OTHER_EVENT, None, None)]
    obj = _object(doc)
    items: list[tuple[str, Any, Any]] = []
    object_id = obj.get("object_id")
    if object_id and obj.get("description"):
        items.append((TITLE, str(object_id), str(obj["description"])))
    query_id = doc.get("query_id")
    if action == "impression":
        items.append(
            (
                IMPRESSION,
                (str(query_id), str(object_id)),
                {
                    "search_id": query_id,
                    "object_id": object_id,
                    "user_query": doc.get("user_query"),
                    "title": obj.get("description"),
                    "position": _ordinal(doc),
                    "timestamp": doc.get("timestamp"),
                    "application": doc.get("application"),
                    "session_id": doc.get("session_id"),
                },
            )
        )
    elif action == "click" and query_id and object_id:
        items.append((CLICK, (str(query_id), str(object_id)), 1))
    else:
        items.append((OTHER_EVENT, None, None))
    return items


def label_impressions(key: Any, grouped: dict[str, Iterable[Any]]) -> Iterable[tuple[str, Any]]:
    """Join clicks onto impressions of one (query_id, object_id); orphan clicks are reported."""
    impressions = list(grouped[IMPRESSION])
    clicks = sum(1 for _ in grouped[CLICK])
    if not impressions:
        if clicks:
            yield ("orphan_click", clicks)
        return
    for record in impressions:
        yield ("record", {**record, "clicked": 1 if clicks else 0})


def fill_title(object_id: str, grouped: dict[str, Iterable[Any]]) -> Iterable[JsonObject]:
    titles = sorted({t for t in grouped[TITLE] if t})  # sorted: deterministic when they differ
    for record in grouped["records"]:
        if not record.get("title") and titles:
            record = {**record, "title": titles[0]}
        yield record


def fill_query(query_id: str, grouped: dict[str, Iterable[Any]]) -> Iterable[JsonObject]:
    texts = sorted({t for t in grouped[QUERY] if t})
    for record in grouped["records"]:
        if not record.get("user_query") and texts:
            record = {**record, "user_query": texts[0]}
        yield record
