"""The shapes of FHIR references and fullUrls that validation and de-identification must read alike: an
absolute URL, a RESTful `Type/id[/_history/v]` tail, and the server base a relative reference resolves
against (FHIR: the base of the referring entry's fullUrl). No imports of the gateway's own: both the
pipeline and the de-identification engine use it."""

from __future__ import annotations

import re
from typing import Any

ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
RESTFUL_TAIL = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def restful_base(full_url: Any) -> str | None:
    """`http://x/fhir/` for `http://x/fhir/Observation/1`; None for urn: or absent fullUrls."""
    if not isinstance(full_url, str) or not ABSOLUTE.match(full_url):
        return None
    tail = RESTFUL_TAIL.search(full_url)
    return full_url[: tail.start() + 1] if tail else None


def relative_restful(reference: str) -> bool:
    """`Type/id` (maybe versioned), not absolute: what resolves against the referring entry's base only."""
    return not ABSOLUTE.match(reference) and RESTFUL_TAIL.search(reference) is not None
