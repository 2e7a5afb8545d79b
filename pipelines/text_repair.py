"""Text repairs a spec may ask for on a text column (`transform:`): HTML to visible text, and
the commonest mojibake undone. pipelines/records.py applies them before a text is validated;
the simulator's lexicon reuses fix_mojibake.
"""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser

_C1 = re.compile(r"[\x80-\x9f]")
_WHITESPACE = re.compile(r"\s+")


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def strip_html(value: str) -> str:
    """Visible text of an HTML fragment, entities decoded, whitespace collapsed."""
    parser = _TextOnly()
    parser.feed(value)
    parser.close()
    return _WHITESPACE.sub(" ", unescape(" ".join(parser.parts))).strip()


def _cp1252_specials() -> dict[str, int]:
    specials = {}
    for byte in range(0x80, 0xA0):
        try:
            specials[bytes([byte]).decode("cp1252")] = byte
        except UnicodeDecodeError:
            specials[chr(byte)] = byte  # undefined in cp1252: latin-1 passes it through
    return specials


_CP1252_BYTE = _cp1252_specials()
_CONTINUATION = "\x80-\xbf" + "".join(re.escape(c) for c in _CP1252_BYTE if ord(c) > 0xFF)
# A UTF-8 lead byte followed by 1-3 continuation bytes, all seen through windows-1252/latin-1.
_MOJIBAKE = re.compile(f"[\xc2-\xf4][{_CONTINUATION}]{{1,3}}")


def fix_mojibake(value: str) -> str:
    """Repair the commonest mojibake: UTF-8 bytes decoded as windows-1252 ("â€\x9d" -> "”"),
    and C1 control characters that are windows-1252 punctuation decoded as latin-1
    (U+0096 -> "–"). What cannot be repaired stays, so the row is still rejected."""

    def utf8(match: re.Match[str]) -> str:
        raw = bytes(_CP1252_BYTE.get(c, ord(c)) for c in match.group())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return match.group()

    def cp1252(match: re.Match[str]) -> str:
        try:
            return match.group().encode("latin-1").decode("cp1252")
        except UnicodeDecodeError:
            return match.group()

    return _C1.sub(cp1252, _MOJIBAKE.sub(utf8, value))


TEXT_TRANSFORMS = {"strip_html": strip_html, "fix_mojibake": fix_mojibake}
