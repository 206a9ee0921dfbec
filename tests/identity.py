"""An independent list of what identifies a person in an input (written apart from the gateway's scanner).

Used by tests to check that none of it appears anywhere in what the gateway delivers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

PERSON_TYPES = {"Patient", "RelatedPerson"}
MIN_LENGTH = 4  # shorter values ("P.", "Z1") occur by chance inside random pseudonyms


def identifying_values(data: Any) -> list[tuple[str, str]]:
    found = {
        (kind, value) for kind, value in _walk(data) if isinstance(value, str) and len(value) >= MIN_LENGTH
    }
    return sorted(found)


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        if node.get("resourceType") in PERSON_TYPES:
            yield from _person(node)
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _person(resource: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for ident in resource.get("identifier") or []:
        yield "identifier", ident.get("value")
    yield "id", resource.get("id")
    holders = [resource, *(resource.get("contact") or [])]
    for holder in holders:
        names = holder.get("name")
        for name in names if isinstance(names, list) else [names] if names else []:
            yield "name", name.get("family")
            yield "name", name.get("text")
            yield from (("name", g) for g in name.get("given") or [])
        for telecom in holder.get("telecom") or []:
            yield "telecom", telecom.get("value")
        addresses = holder.get("address")
        for address in addresses if isinstance(addresses, list) else [addresses] if addresses else []:
            yield from (("street", line) for line in address.get("line") or [])
            postcode = address.get("postalCode")
            if isinstance(postcode, str):
                yield "postcode", postcode
                yield "postcode", postcode.replace(" ", "")


def leaked_kinds(source: Any, output_text: str) -> list[str]:
    """Kinds of identifying values of `source` found in `output_text` (serialised JSON).

    Resource ids are matched as whole JSON values or reference tails (`"example"`, `Patient/example"`):
    a short id such as `example` otherwise matches inside unrelated words like `example-generic`.
    """
    hits = []
    public = set(_strings_of(source, {"Organization", "Location"}))
    for kind, value in identifying_values(source):
        if (
            value in public
        ):  # e.g. a patient living in the hospital's own postcode area: kept as the hospital's
            continue
        if kind == "id":
            if f'"{value}"' in output_text or f'/{value}"' in output_text:
                hits.append(kind)
        elif value.isdigit():
            # digits-only values (US postcodes, numbers) as whole tokens: "02169" occurs inside random hex ids
            # and base64 pseudonyms by chance (keys are random per run), which is no leak and made this flaky
            if re.search(rf"(?<![0-9A-Za-z]){value}(?![0-9A-Za-z])", output_text):
                hits.append(kind)
        elif value in output_text:
            hits.append(kind)
    return hits


def _strings_of(node: Any, types: set[str], inside: bool = False) -> Iterator[str]:
    if isinstance(node, dict):
        inside = inside or node.get("resourceType") in types
        for value in node.values():
            yield from _strings_of(value, types, inside)
    elif isinstance(node, list):
        for value in node:
            yield from _strings_of(value, types, inside)
    elif inside and isinstance(node, str):
        yield node
