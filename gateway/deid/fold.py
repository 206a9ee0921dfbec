"""Text folded the way a reader sees it, for the leak gate: both the input's identifying values and the output
are compared folded, so that a BSN in fullwidth or Arabic-Indic digits, a name with a soft hyphen or a
zero-width space in it, with an added accent, or with a Cyrillic letter that looks Latin, is still that BSN or
that name. ASCII text is never changed (and costs one check).

Each non-ASCII character is folded once per process (``_Folding.__missing__``):
- invisible format characters (Unicode category Cf: soft hyphen, zero-width space, joiners) are removed;
- decimal digits of any script become ASCII digits;
- Cyrillic, Greek and Armenian letters that look like Latin ones (and the dotless ı) become those;
- dashes and the minus sign become "-", middle dots ".", typographic apostrophes "'";
- otherwise the compatibility decomposition (NFKD) without its combining marks: "é" is "e", "９" is "9", a
  no-break space is a space; a lone combining mark is removed.
What folds to a JSON delimiter ('"', '\\') or a control character becomes a space instead, so a folded JSON
text is still the same JSON document with folded strings.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import orjson

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# letters of other scripts that look like Latin ones ("Bеrkhout" with a Cyrillic е reads as the name)
_LOOKALIKES = dict(
    zip(
        "аеорсухіјѕԁӏһԛԝӀҺАВЕКМНОРСТХУІЈЅ" "αονιρκχτυϲΑΒΕΖΗΙΚΜΝΟΡΤΥΧ" "օսոհı",
        "aeopcyxijsdlhqwlhABEKMHOPCTXYIJS" "aovipkxtucABEZHIKMNOPTYX" "ounhi",
        strict=True,
    )
)
# separators that read as ASCII ones: dashes and the minus sign, middle dots, typographic apostrophes
_PUNCTUATION = {"\u2212": "-", "\u00b7": ".", "\u2027": ".", "\u2022": ".", "\u2018": "'", "\u2019": "'"}
_PUNCTUATION |= {"\u02bc": "'", "\u2032": "'"}


class _Folding(dict[int, str]):
    """str.translate's table, filled on first sight of each character."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        category = unicodedata.category(char)
        if category == "Cf":
            folded = ""
        elif category == "Nd":
            folded = str(unicodedata.digit(char))
        elif char in _LOOKALIKES:
            folded = _LOOKALIKES[char]
        elif char in _PUNCTUATION:
            folded = _PUNCTUATION[char]
        elif category == "Pd":
            folded = "-"
        else:
            folded = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        if any(c in '"\\' or c < " " for c in folded):
            folded = " "
        self[code] = folded
        return folded


_FOLDING = _Folding()


def _fold_run(match: re.Match[str]) -> str:
    return match.group().translate(_FOLDING)


def fold(text: str) -> str:
    """``text`` as the leak gate compares it (see the module docstring)."""
    return text if text.isascii() else _NON_ASCII.sub(_fold_run, text)


def fold_document(serialized: bytes) -> tuple[Any, bytes] | None:
    """The document serialised as ``serialized`` (orjson's output) with every string and key folded, and its
    serialisation; None when nothing folds (an ASCII document, the common case)."""
    if serialized.isascii():
        return None
    text = serialized.decode()
    folded = fold(text)
    if folded == text:
        return None
    document = orjson.loads(folded)
    return document, orjson.dumps(document)
