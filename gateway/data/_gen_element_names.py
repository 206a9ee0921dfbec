"""Regenerate ``fhir-element-names.txt``: every element name of FHIR R4B, R5 and STU3 (from the models of
fhir.resources), plus a few DSTU2 names that EHRs still send, one per line.

Run: ``python -m gateway.data._gen_element_names``. The parse and validate stages may name a property in an
error only when it is structure, not data (see ``gateway.pipeline.parse.safe_name``); an element name of
another FHIR version ("animal" of STU3, "medication" of R5) is structure, and naming it helps the integrator.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

OUT = Path(__file__).with_name("fhir-element-names.txt")
PACKAGES = ("fhir.resources", "fhir.resources.STU3", "fhir.resources.R4B")
SKIP = {"fhirtypes", "fhirtypesvalidators", "fhirprimitiveextension"}
DSTU2 = {"transaction", "transactionResponse", "base", "fhir_comments"}  # no DSTU2 models to read them from


def element_names() -> set[str]:
    names = set(DSTU2)
    for package in PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if info.ispkg or info.name.startswith("_") or info.name in SKIP:
                continue
            module = importlib.import_module(f"{package}.{info.name}")
            for obj in vars(module).values():
                fields = getattr(obj, "model_fields", None)
                if isinstance(fields, dict):
                    names.update((f.alias or n).lstrip("_") for n, f in fields.items())
    return {n for n in names if n.isidentifier()}


if __name__ == "__main__":
    OUT.write_text("".join(f"{n}\n" for n in sorted(element_names())), encoding="utf-8")
    print(f"{OUT}: {len(element_names())} names")
