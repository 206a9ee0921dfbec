"""One processor per de-identification method, and the type-directed walk that calls them.

A compiled *node* is ``(fields, label, plain, must)``: ``fields`` maps an element name to a *field*
``(op, sub_node, processor, arg, label)``. The walk builds a new dict from the input dict, looking each key up
once: elements absent from ``fields`` are not allowed (counted, never copied). ``must`` lists what FHIR R4
requires of the element (``Observation.component`` needs its ``code``): an element that loses one of those
is left out whole, so that what leaves is valid R4 (its parent may then be incomplete in turn). Nothing
here interprets FHIRPath and nothing deep-copies the input; primitives are shared (immutable), containers
are rebuilt.

Processors take ``(value, field, ctx)`` and return the output value or ``None`` (= leave the element out).
They must never raise on malformed input (wrong JSON types are dropped), except ``DropResource`` which
tells the engine to drop the whole resource.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from gateway.deid.r4 import r4
from gateway.fhirurls import relative_restful
from gateway.pseudonym.normalise import postcode4

KEEP, COMPLEX, REMOVE, CALL = 0, 1, 2, 3
_PRIMITIVE = (str, int, float, bool)
_PRIMITIVE_SET = frozenset(_PRIMITIVE)

# (fields, label, plain, must): ``plain`` = the names whose field is KEEP (a JSON primitive), filled once by
# the compiler after the fields (nodes are created before they are filled because datatypes are recursive);
# ``must`` = per required element the names that satisfy it (every variant of a required choice element)
Node = tuple[dict[str, tuple], str, set[str], tuple[tuple[str, ...], ...]]


def finish(node: Node) -> Node:
    """Compute ``plain`` once the fields are complete."""
    node[2].update(name for name, f in node[0].items() if f[0] == KEEP)
    return node


Processor = Callable[[Any, tuple, "WalkContext"], Any]


class DropResource(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the walk: the current resource cannot be delivered (``reason`` is a fixed code)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class WalkContext:
    """Per-bundle state of one ``deidentify`` call (never shared between calls)."""

    __slots__ = (
        "removed",
        "resolve",
        "ref_map",
        "keep_display",
        "date_offset",
        "extensions",
        "modifier_ok",
        "references_dropped",
        "pseudonyms",
        "emitted",
        "base",
    )

    def __init__(
        self,
        *,
        resolve: Callable[[str], str | None],
        ref_map: dict[str, str],
        keep_display: bool,
        extensions: dict[str, Node],
        modifier_ok: frozenset[str],
    ):
        self.removed: dict[str, int] = {}
        self.resolve = resolve
        self.ref_map = ref_map  # exact fullUrl / Type/id -> new urn; ``resolve`` handles every other form
        self.keep_display = keep_display
        self.date_offset = 0
        self.extensions = extensions  # allowed url -> node to walk the extension with
        self.modifier_ok = modifier_ok
        self.references_dropped = 0
        self.pseudonyms: list[dict[str, Any]] = []
        self.emitted: list[str] = []  # the references written into the resource being walked
        # the RESTful base of the entry being walked (`http://x/fhir/`), None for a urn: fullUrl: a relative
        # reference resolves against it only, as validation reads it (FHIR's rule)
        self.base: str | None = None

    def count(self, label: str) -> None:
        self.removed[label] = self.removed.get(label, 0) + 1


# ── the walk (method `keep` for complex elements) ───────────────────────────────────────────────────────────


def walk(
    src: dict[str, Any], node: Node, ctx: WalkContext, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build the output dict of ``src`` (into ``out`` if given). The hot loop of the engine: kept flat.
    Returns ``{}`` when the element lost something FHIR requires of it (the caller leaves it out)."""
    fields, label, plain, must = node
    if out is None:
        if src.keys() <= plain:
            # fast path (Coding, Quantity, Period...): every key is a kept primitive; copy if the values are.
            # The copy holds what the input held, and validation has checked the input's required elements
            for value in src.values():
                t = type(value)
                if t is not str and t not in _PRIMITIVE_SET:
                    break
            else:
                return dict(src)
        out = {}
    removed = ctx.removed
    for key, value in src.items():
        f = fields.get(key)
        if f is None:
            # not allowed (or not FHIR): the key itself is input, so it is counted under a fixed label
            lbl = label + ".(not-allowed)"
            removed[lbl] = removed.get(lbl, 0) + 1
            continue
        op = f[0]
        if op == KEEP:
            t = type(value)
            if t is str or t in _PRIMITIVE_SET:
                out[key] = value
                continue
            r = keep_primitive(value, f, ctx)
        elif op == COMPLEX:
            t = type(value)
            if t is dict:
                sub = f[1]
                if value.keys() <= sub[2]:  # the fast path of walk, inlined (Quantity, Period, Coding)
                    for v in value.values():
                        tv = type(v)
                        if tv is not str and tv not in _PRIMITIVE_SET:
                            break
                    else:
                        out[key] = dict(value)
                        continue
                r = walk(value, sub, ctx) or None
            elif t is list:
                sub = f[1]
                splain = sub[2]
                r = []
                for item in value:
                    if type(item) is dict:
                        if item.keys() <= splain:  # the fast path of walk, inlined for lists of Codings
                            for v in item.values():
                                tv = type(v)
                                if tv is not str and tv not in _PRIMITIVE_SET:
                                    break
                            else:
                                r.append(dict(item))
                                continue
                        x = walk(item, sub, ctx)
                        if x:
                            r.append(x)
                r = r or None
            else:
                r = keep_complex(value, f, ctx)
        elif op == CALL:
            r = f[2](value, f, ctx)
        else:  # REMOVE
            lbl = f[4]
            if lbl is not None:
                removed[lbl] = removed.get(lbl, 0) + 1
            continue
        if r is not None:
            out[key] = r
    if must and out and not complete(out, must):
        lbl = label + ".(required-element-lost)"
        removed[lbl] = removed.get(lbl, 0) + 1
        return {}
    return out


def complete(out: dict[str, Any], must: tuple[tuple[str, ...], ...]) -> bool:
    """Whether ``out`` holds, for every required element, one of the names that satisfy it."""
    for names in must:
        for name in names:
            if name in out:
                break
        else:
            return False
    return True


def keep_primitive(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """keep, primitive: copied if a JSON primitive (or a list of them; nulls kept for `_x` alignment)."""
    t = type(value)
    if t in _PRIMITIVE:
        return value
    if t is list:
        out = [v for v in value if v is None or type(v) in _PRIMITIVE]
        return out or None
    ctx.count(f[4] + ".(malformed)")
    return None


def keep_complex(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """keep, complex: walked with the element's own node, so rules apply inside it too."""
    sub = f[1]
    t = type(value)
    if t is dict:
        return walk(value, sub, ctx) or None
    if t is list:
        out = []
        for item in value:
            if type(item) is dict:
                r = walk(item, sub, ctx)
                if r:
                    out.append(r)
        return out or None
    ctx.count(f[4] + ".(malformed)")
    return None


def primitive_element(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """keep for ``_x`` (id/extensions of a primitive); list positions are kept aligned with ``x``."""
    sub = f[1]
    t = type(value)
    if t is dict:
        return walk(value, sub, ctx) or None
    if t is list:
        out = [(walk(item, sub, ctx) or None) if type(item) is dict else None for item in value]
        return out if any(x is not None for x in out) else None
    return None


# ── extensions ───────────────────────────────────────────────────────────────────────────────────────────


def extensions(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """Extension allow-list: unknown urls dropped. ``arg`` = the parts of a kept complex extension (relative
    url -> node, e.g. "value"); any other part is dropped like an unknown extension."""
    if type(value) is not list:
        return None
    parts = f[3]
    out = []
    for ext in value:
        if type(ext) is not dict:
            continue
        url = ext.get("url")
        if type(url) is not str:
            continue
        node = ctx.extensions.get(url)
        if node is None and parts:
            node = parts.get(url)
        if node is None:
            ctx.count("extension.(not-allowed)")
            continue
        r = walk(ext, node, ctx)
        if len(r) > 1 or "extension" in r:
            out.append(r)
    return out or None


def modifier_extensions(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """A modifier changes the meaning of its resource: unknown ones make the resource undeliverable."""
    if type(value) is not list:
        raise DropResource("unknown-modifierExtension")
    for ext in value:
        url = ext.get("url") if type(ext) is dict else None
        if type(url) is not str or url not in ctx.modifier_ok:
            raise DropResource("unknown-modifierExtension")
    return extensions(value, (CALL, None, extensions, None, f[4]), ctx)


# ── generalise ───────────────────────────────────────────────────────────────────────────────────────────


def _shift(value: Any, days: int, partial_from: str | None = None) -> str | None:
    """A full date moves by ``days``. A partial date (year, year-month) stays, except as a Period's start or
    end (``partial_from``: its "first" or "last" day), which moves with its day at that end, so that start <=
    end holds after the shift too (per-1: 2024-01-31 .. 2024-01 must not become 2024-02-04 .. 2024-01)."""
    if type(value) is not str:
        return None
    if len(value) < 10:
        if not value[:4].isdigit():
            return None
        return _shift_partial(value, days, partial_from) if partial_from else value
    try:
        shifted = date(int(value[0:4]), int(value[5:7]), int(value[8:10])) + timedelta(days=days)
    except (ValueError, OverflowError):
        # not a date (a test-engine placeholder), or one the shift takes past year 1 or 9999 (EHRs write
        # 0001-01-01 and 9999-12-31 for "unknown" and "open"): cannot be shifted, so not delivered
        return None
    if value[4] != "-" or value[7] != "-":
        return None
    return shifted.isoformat() + value[10:]


def _shift_partial(value: str, days: int, partial_from: str) -> str | None:
    try:
        year = int(value[0:4])
        month = int(value[5:7]) if len(value) == 7 and value[4] == "-" else None
        if month is None and len(value) != 4:
            return None
        first = date(year, month or 1, 1)
        last = date(year, month or 12, calendar.monthrange(year, month or 12)[1])
        moved = (first if partial_from == "first" else last) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}" if month is None else f"{moved.year:04d}-{moved.month:02d}"


def generalise_date(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """generalise kind=date with to=shift: every full date moves by the patient's offset (same for all).
    ``arg``: for a Period's start or end, the day ("first", "last") its partial date moves with."""
    days = ctx.date_offset
    partial_from = f[3]
    if type(value) is list:
        out = [_shift(v, days, partial_from) for v in value]
        # one date that cannot be shifted (0001-01-01 moved back) takes the list: a null in it is not R4
        # without its `_x` partner, and leaving one out would misalign that partner (a probe's Timing.event)
        return out if all(v is not None for v in out) else None
    return _shift(value, days, partial_from)


def generalise_birthdate(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """generalise kind=birthDate: year | year-month | keep (shifted too when dates are shifted)."""
    if type(value) is not str or len(value) < 4 or not value[:4].isdigit():
        return None
    mode, shift = f[3]
    if mode == "year":
        return value[:4]
    if mode == "year-month":
        return value[:7] if len(value) >= 7 else value[:4]
    return _shift(value, ctx.date_offset) if shift else value


def generalise_postcode(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """generalise kind=address, the postcode part: a Dutch postcode becomes its 4 digits (PC4)."""
    if type(value) is not str:
        return None
    pc4 = postcode4(value)  # as RGG reads it: whitespace anywhere ("1015 K D"), any case
    if pc4 is None:
        ctx.count("Address.postalCode.(not-dutch)")
        return None  # foreign or malformed postcodes may be fine-grained: not delivered
    return pc4


# ── references and identifiers ──────────────────────────────────────────────────────────────────────────────


def _reference(value: Any, ctx: WalkContext) -> dict[str, Any] | None:
    if type(value) is not dict:
        return None
    ref = value.get("reference")
    if type(ref) is str and ctx.base is not None and relative_restful(ref):
        # `Observation/o2` in an entry under http://x/fhir/ is http://x/fhir/Observation/o2 only; another
        # server's o2 in the Bundle is not it (a re-probe's linked two patients' records)
        new = ctx.ref_map.get(ctx.base + ref.split("/_history/", 1)[0])
    else:
        new = ctx.ref_map.get(ref) if type(ref) is str else None  # the common case: a fullUrl or Type/id
        if new is None and type(ref) is str:
            new = ctx.resolve(ref)
    if new is None:
        # unresolvable, external, to a dropped resource, or logical (identifier/display only)
        ctx.references_dropped += 1
        return None
    ctx.emitted.append(new)
    if len(value) == 1:
        return {"reference": new}  # the commonest shape
    out: dict[str, Any] = {"reference": new}
    rtype = value.get("type")
    if type(rtype) is str and rtype in r4().resources:  # a resource type name, not any text a uri can hold
        out["type"] = rtype
    if "display" in value:
        display = value["display"]
        if ctx.keep_display and type(display) is str:
            out["display"] = display
        else:
            removed = ctx.removed
            removed["Reference.display"] = removed.get("Reference.display", 0) + 1
    if "identifier" in value:
        ctx.count("Reference.identifier")
    return out


def pseudonymise_reference(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """pseudonymise-reference: the target's opaque id, or nothing when the target is not delivered."""
    if type(value) is dict:
        return _reference(value, ctx)
    if type(value) is list:
        out = [r for r in (_reference(v, ctx) for v in value) if r is not None]
        return out or None
    return None


def replace_with_pseudonyms(value: Any, f: tuple, ctx: WalkContext) -> Any:
    """replace-with-pseudonyms: whatever identifiers came in, only the TTP's pseudonyms go out."""
    ctx.count(f[4])
    return [dict(p) for p in ctx.pseudonyms] or None
