"""The one reader of the project's YAML files: training configs (`--config`, the defaults), the
experiment protocol, dataset specs and a store's `feature_store.yaml`.

A file is read bounded and safe (at most 64 KiB, no aliases, nesting at most 32 levels: nine lines
of nested aliases expand into 10^9 strings, and the composer recurses), and every problem is one
line: a YAML error by line and column (never the quoted text: the file may not be YAML at all), a
binary file, a list or a number where a mapping belongs, and a key nothing reads, named with the
nearest key that something does. Imports nothing from nlpctr but its errors (and JsonObject), so
every layer can use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32


class RefusedYaml(Exception):
    """A YAML file refused before it is built: too big, an alias, nested too deep."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with bounded nesting."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.AliasEvent):
            raise RefusedYaml(
                f"line {line}: YAML aliases (*{str(event.anchor)[:40]}) are not allowed; write the value out"
            )
        if self._depth >= MAX_DEPTH:
            raise RefusedYaml(f"line {line}: nested more than {MAX_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_bounded(path: Path, noun: str = "the file") -> Any:
    """The YAML document in `path`, bounded (see the module docstring); `noun` names it in the
    size message ("a spec").

    Args:
        path: the YAML file.
        noun: how the size message names it.

    Returns:
        The parsed document (None for an empty file).

    Raises:
        RefusedYaml: over MAX_BYTES, an alias, nested deeper than MAX_DEPTH.
        yaml.YAMLError: not YAML.
        UnicodeDecodeError: not UTF-8 (a binary file).
        OSError: unreadable.
    """
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RefusedYaml(f"{size:,} bytes; {noun} is at most {MAX_BYTES // 1024} KiB")
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RefusedYaml(f"more than {MAX_BYTES // 1024} KiB; {noun} is at most that")
    return yaml.load(data.decode("utf-8"), Loader=BoundedLoader)  # a SafeLoader


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, in one line, without the file's text (PyYAML's message quotes it)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = (exc.problem or exc.context or type(exc).__name__)[:80]
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first[:80]


def read_yaml(path: Path, what: str, fix: str) -> Any:
    """The YAML document in `path`; any problem is a UserError "`what`: <problem>; `fix`".

    Args:
        path: the file.
        what: how the message names it, e.g. "--config run.yaml".
        fix: what the user does about a damaged file, e.g. "fix the file".

    Returns:
        The document (None for an empty file).

    Raises:
        UserError: missing, not a file, unreadable, too big, not UTF-8, not YAML.
    """
    path = Path(path)
    try:
        if not path.is_file():
            state = "is a folder" if path.is_dir() else "does not exist"
            raise UserError(f"{what} {state}; name a YAML file")
        return load_bounded(path)
    except RefusedYaml as exc:
        raise UserError(f"{what}: refused: {exc}; {fix}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{what} is not valid YAML ({yaml_problem(exc)}); {fix}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} is not a YAML text file (not UTF-8 at byte {exc.start}); {fix}") from None
    except OSError as exc:
        raise UserError(f"{what} cannot be read ({exc.strerror}); check the path") from None


def read_mapping(path: Path, what: str, fix: str) -> JsonObject:
    """`read_yaml` of a file that holds a mapping (an empty file: an empty one).

    Args:
        path: the YAML file.
        what: how the message names the file (e.g. "--config FILE").
        fix: what the message says to do.

    Returns:
        The mapping; an empty dict for an empty file.

    Raises:
        UserError: as `read_yaml`, and when the document is a list, a number or a text.
    """
    content = read_yaml(path, what, fix)
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{what} holds {_kind(content)}, not a mapping of settings; {fix}")
    return content


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({_shown(value)})"


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nearest(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a misspelt one (difflib's ratio >= 0.6), or None."""
    found = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return found[0] if found else None


# A schema is a nested mapping of the keys something reads: a mapping value is a section whose
# keys are checked in turn; LEAF is any value (a number, a list, or a mapping read as a whole).
LEAF = None
Schema = Mapping[str, "Schema | None"]


def check_keys(given: JsonObject, schema: Schema, what: str, where: str = "") -> None:
    """Refuse a key `schema` does not know (naming the nearest known key), and a value that is not a
    mapping where a section belongs.

    Args:
        given: the settings read from a file (already checked to be a mapping).
        schema: the known keys (see `LEAF`).
        what: the file, as messages name it.
        where: the dotted path of `given` inside the file ("" at the top).

    Raises:
        UserError: an unknown key, or a section that is not a mapping.
    """
    for key, value in given.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in schema:
            close = nearest(str(key), schema)
            hint = f"did you mean `{f'{where}.{close}' if where else close}`?" if close else ""
            known = ", ".join(sorted(map(str, schema)))
            raise UserError(
                f"{what}: unknown key `{path[:60]}`; {hint or f'known keys here: {known}'} "
                "(a key nothing reads would be silently ignored)"
            )
        section = schema[key]
        if isinstance(section, Mapping):
            if value is None:
                continue  # an empty section: the defaults
            if not isinstance(value, Mapping):
                raise UserError(
                    f"{what}: `{path}` is a section of settings, got {_kind(value)}; write it as "
                    f"`{key}: {{...}}` or leave it out"
                )
            check_keys(value, section, what, path)


def is_integer(value: Any) -> bool:
    """An int that is not a bool (YAML's `true` is an int to Python, and no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_integer(name: str, value: Any, low: int = 1) -> None:
    """Refuse anything but an integer >= `low`.

    Raises:
        UserError: "`name` must be an integer >= `low`, got <value>".
    """
    if not is_integer(value) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
