"""What a delivery may carry for being tied to a patient: one rule for the posted Bundle (before anything is
pseudonymised) and for what de-identification leaves (after the profile cut its elements).

A resource goes when it leads to a delivered patient through its references (an Observation through its
Encounter), when something that does refers to it (a Practitioner named as performer), or when it is a
shared resource (a professional's role, a place, an organisation: about no patient) that refers to one of
those (the PractitionerRole of a delivered Practitioner). Such a role brings nothing else along: what it
refers to may be an objector's (a Device `parent` of one patient's implant, pointing at another's), and a
probe had an objector's implant and medication delivered through such bridges. Anything else is someone's
data whose someone cannot be known (an Observation without a subject), and is not delivered.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping
from typing import TypeVar

# Resources about no patient: what the registry may get beside the patients' data, never a reason to
# deliver a patient's resource
SHARED_TYPES = frozenset(
    {
        "Device",
        "Endpoint",
        "HealthcareService",
        "Location",
        "Medication",
        "Organization",
        "OrganizationAffiliation",
        "Practitioner",
        "PractitionerRole",
        "Substance",
    }
)

N = TypeVar("N", bound=Hashable)


def linked_to_patients(
    refers_to: Mapping[N, Collection[N]],
    types: Mapping[N, str],
    patients: Iterable[N],
    named: Collection[N] = frozenset(),
) -> set[N]:
    """The nodes of `refers_to` (each one's references, to nodes of it or not) that may be delivered.
    `named`: what some patient's own resource refers to (an objector's too, when the caller still knows
    them): reached through a shared resource only when a delivered patient's resource names it as well
    (a Device of A's whose `parent` is B's implant must not take the implant along)."""
    referred_by: dict[N, list[N]] = {}
    for source, targets in refers_to.items():
        for target in targets:
            if target in refers_to:
                referred_by.setdefault(target, []).append(source)
    reached = {p for p in patients if p in refers_to}
    _walk(reached, referred_by, refers_to)  # what leads to a patient
    _walk(reached, refers_to, refers_to, types, named)  # and what that refers to
    roles = {
        n
        for n, kind in types.items()
        if kind in SHARED_TYPES and n not in reached and any(t in reached for t in refers_to.get(n, ()))
    }
    return reached | roles


def _walk(
    reached: set[N],
    edges: Mapping[N, Collection[N]],
    nodes: Collection[N],
    types: Mapping[N, str] | None = None,
    named: Collection[N] = frozenset(),
) -> None:
    """Adds to `reached` every node of `nodes` its members lead to along `edges`; out of a shared resource
    (by `types`) never to a `named` one."""
    queue = list(reached)
    while queue:
        node = queue.pop()
        through_shared = types is not None and types.get(node) in SHARED_TYPES
        for nxt in edges.get(node, ()):
            if nxt in nodes and nxt not in reached and not (through_shared and nxt in named):
                reached.add(nxt)
                queue.append(nxt)
