"""Generate the bad-input collection: small body files and `cases.yaml` (deterministic; re-run after edits).

    .venv/bin/python tests/badinput/generate.py          # rewrites tests/badinput/*.body, *.json, cases.yaml

Each case says which layer must reject (or accept) it: `parse` (bytes → dict), `validate` (schema and Bundle
rules), `optout` (the Bundle's own Consents decide about the patient) or `http` (only the HTTP layer can
tell: content types). Large bodies are not stored: their `generated` spec is expanded at test time by
`generated_body()` (importable by the HTTP test, too). Corpus-derived cases read /work/shared/corpus (or
$FHIR_CORPUS) at generation time; `truncate:` and `corpus:` specs read it at test time.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("FHIR_CORPUS", "/work/shared/corpus"))
FHIR_JSON = "application/fhir+json"
BSN = "http://fhir.nl/fhir/NamingSystem/bsn"
MRN_SYSTEM = "http://hospital.example.nl/fhir/NamingSystem/patientnummer"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
PLACEHOLDER = "${DATE, T, D, -60}"
REGISTRY_URA = "00009999"  # the registry's identifier in the opt-out policy of cases.yaml
URA = "http://fhir.nl/fhir/NamingSystem/ura"

DEFAULTS = {
    "max_bytes": 10 * 1024 * 1024,
    "max_depth": 100,
    "require_patient": True,
    "provider": "ura:00001234",
    "registry": "dica",
    "content_type": FHIR_JSON,
    "optout_policy": {
        "purposes": [f"{ACT_REASON}|HQUALIMP", f"{ACT_REASON}|HRESCH"],
        "registry_actors": {"dica": [f"{URA}|{REGISTRY_URA}", "Organization/registry-dica"]},
        "registry_policies": {"dica": ["https://registry.example.nl/policy/dica-optout"]},
    },
}

# A fictitious patient whose values are distinctive enough to be found if an error text ever echoed them.
SECRETS = [
    "999911120",
    "MRN-7734421",
    "Vermeulen-Oosterhuis",
    "Geertruida",
    "1961-07-23",
    "Kerkstraat",
    "8011 AB",
]
PATIENT_URL = "urn:uuid:7f3a0c1e-0000-4000-8000-000000000001"


def patient(**changes: Any) -> dict:
    resource = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [{"system": BSN, "value": "999911120"}, {"system": MRN_SYSTEM, "value": "MRN-7734421"}],
        "name": [{"use": "official", "family": "Vermeulen-Oosterhuis", "given": ["Geertruida"]}],
        "gender": "female",
        "birthDate": "1961-07-23",
        "address": [{"use": "home", "line": ["Kerkstraat 12"], "city": "Zwolle", "postalCode": "8011 AB"}],
    }
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


def observation(subject: str = PATIENT_URL, **extra: Any) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2026-01-03T08:15:00+01:00",
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        **extra,
    }


def encounter(subject: str = PATIENT_URL, **extra: Any) -> dict:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": subject},
        **extra,
    }


def url(n: int) -> str:
    return PATIENT_URL if n == 1 else f"urn:uuid:7f3a0c1e-0000-4000-8000-{n:012d}"


def bundle(*resources: dict, type: str = "transaction", urls: list[str | None] | None = None) -> dict:
    entries = []
    for i, resource in enumerate(resources):
        entry: dict[str, Any] = {}
        full_url = urls[i] if urls is not None else url(i + 1)
        if full_url is not None:
            entry["fullUrl"] = full_url
        entry["resource"] = resource
        if type in ("transaction", "batch"):
            entry["request"] = {"method": "POST", "url": resource["resourceType"]}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": type, "entry": entries}


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=1).encode()


@dataclass
class Case:
    name: str
    layer: str
    status: int
    code: str | None = None
    expression: str | None = None
    body: bytes | None = None  # stored as a file
    generated: str | None = None  # expanded at test time
    content_type: str = FHIR_JSON
    secrets: list[str] = field(default_factory=list)
    optout: str | dict | None = None
    warning: str | None = None
    note: str = ""

    def file_name(self) -> str | None:
        if self.body is None:
            return None
        try:
            json.loads(self.body.decode("utf-8"))
            return f"{self.name}.json"
        except (UnicodeDecodeError, ValueError, RecursionError):
            return f"{self.name}.body"

    def as_yaml(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "layer": self.layer}
        if self.body is not None:
            out["body"] = self.file_name()
        else:
            out["body"] = None
            out["generated"] = self.generated
        out["content_type"] = self.content_type
        out["status"] = self.status
        out["code"] = self.code
        if self.expression:
            out["expression"] = self.expression
        if self.warning:
            out["warning"] = self.warning
        if self.optout is not None:
            out["optout"] = self.optout
        if self.secrets:
            out["secrets"] = self.secrets
        if self.note:
            out["note"] = self.note
        return out


# --- parse layer -----------------------------------------------------------------------------------

VALID = dumps(bundle(patient(), observation(subject=PATIENT_URL)))


def parse_cases() -> list[Case]:
    cases = [
        Case("empty-body", "parse", 400, "required", body=b"", note="zero bytes"),
        Case("whitespace-only", "parse", 400, "required", body=b" \r\n\t \n"),
        Case(
            "utf8-bom-accepted",
            "parse",
            200,
            body=b"\xef\xbb\xbf" + VALID,
            secrets=SECRETS,
            note="a UTF-8 BOM is stripped and the body accepted (RFC 8259 8.1 allows ignoring it)",
        ),
        Case(
            "utf8-bom-twice",
            "parse",
            400,
            "structure",
            body=b"\xef\xbb\xbf\xef\xbb\xbf" + VALID,
            secrets=SECRETS,
        ),
        Case(
            "utf16le-bom",
            "parse",
            415,
            "not-supported",
            body=VALID.decode().encode("utf-16"),
            secrets=SECRETS,
        ),
        Case(
            "utf16be-bom",
            "parse",
            415,
            "not-supported",
            body=b"\xfe\xff" + VALID.decode().encode("utf-16-be"),
            secrets=SECRETS,
        ),
        Case(
            "utf16le-no-bom",
            "parse",
            415,
            "not-supported",
            body=VALID.decode().encode("utf-16-le"),
            secrets=SECRETS,
        ),
        Case(
            "utf16be-no-bom",
            "parse",
            415,
            "not-supported",
            body=VALID.decode().encode("utf-16-be"),
            secrets=SECRETS,
        ),
        Case(
            "utf32-bom", "parse", 415, "not-supported", body=VALID.decode().encode("utf-32"), secrets=SECRETS
        ),
        Case(
            "utf32be-no-bom",
            "parse",
            415,
            "not-supported",
            body=VALID.decode().encode("utf-32-be"),
            secrets=SECRETS,
        ),
    ]
    for name, text in [
        ("latin1-umlaut", "Müller"),
        ("latin1-eszett", "Großmann"),
        ("latin1-accents", "Hélène Geüs"),
    ]:
        body = (
            dumps(bundle(patient(name=[{"family": text, "given": ["Geertruida"]}])))
            .decode()
            .encode("latin-1")
        )
        cases.append(
            Case(
                name,
                "parse",
                400,
                "structure",
                body=body,
                secrets=[text, "999911120"],
                note="Latin-1 bytes for non-ASCII letters are not UTF-8",
            )
        )
    cp1252 = dumps(bundle(patient(name=[{"family": "Vermeulen-Oosterhuis", "suffix": ["€ Œuvre"]}])))
    cases.append(
        Case(
            "cp1252-euro",
            "parse",
            400,
            "structure",
            body=cp1252.decode().encode("cp1252"),
            secrets=["Vermeulen-Oosterhuis", "999911120"],
        )
    )
    raw_bad_utf8 = [
        ("utf8-overlong-slash", b"\xc0\xaf"),
        ("utf8-lone-continuation", b"\x80"),
        ("utf8-truncated-sequence", b"\xe2\x82"),
        ("utf8-encoded-surrogate", b"\xed\xa0\x80"),
        ("utf8-beyond-unicode", b"\xf4\x90\x80\x80"),
        ("utf8-ff-byte", b"\xff"),
    ]
    for name, junk in raw_bad_utf8:
        body = VALID.replace(b"Geertruida", b"Geert" + junk + b"ruida", 1)
        cases.append(Case(name, "parse", 400, "structure", body=body, secrets=SECRETS))
    malformed = {
        "json-missing-comma": VALID.replace(b'",\n', b'"\n', 1),
        "json-trailing-comma-object": b'{"resourceType": "Bundle", "type": "collection",}',
        "json-trailing-comma-array": b'{"resourceType": "Bundle", "type": "collection", "entry": [{},]}',
        "json-single-quotes": b"{'resourceType': 'Patient', 'name': [{'family': 'Vermeulen-Oosterhuis'}]}",
        "json-unquoted-key": b'{resourceType: "Patient"}',
        "json-comment": b'{"resourceType": "Patient" /* Vermeulen-Oosterhuis */}',
        "json-line-comment": b'{"resourceType": "Patient", // 999911120\n "gender": "female"}',
        "json-nan": b'{"resourceType": "Observation", "valueQuantity": {"value": NaN}}',
        "json-infinity-literal": b'{"resourceType": "Observation", "valueQuantity": {"value": Infinity}}',
        "json-python-literals": b'{"resourceType": "Patient", "active": True}',
        "json-leading-zero": b'{"resourceType": "Patient", "multipleBirthInteger": 01}',
        "json-plus-number": b'{"resourceType": "Patient", "multipleBirthInteger": +1}',
        "json-bare-fraction": b'{"resourceType": "Observation", "valueQuantity": {"value": .5}}',
        "json-hex-number": b'{"resourceType": "Patient", "multipleBirthInteger": 0x1F}',
        "json-control-char": b'{"resourceType": "Patient", "name": [{"family": "Vermeulen\x01Oosterhuis"}]}',
        "json-raw-newline-in-string": b'{"resourceType": "Patient", "name": [{"family": "Vermeulen\n"}]}',
        "json-invalid-escape": b'{"resourceType": "Patient", "name": [{"family": "Vermeulen\\xOosterhuis"}]}',
        "json-lone-surrogate-escape": b'{"resourceType": "Patient", "name": [{"family": "Geert\\ud800"}]}',
        "json-trailing-garbage": VALID + b"\nGeertruida 999911120",
        "json-two-documents": VALID + VALID,
        "json-break-out": b'{"resourceType": "Patient"}],[{"resourceType": "Patient"}',
        "json-only-open-brace": b"{",
        "json-only-close-brace": b"}",
        "json-unterminated-string": b'{"resourceType": "Patient", "name": [{"family": "Vermeulen-Oosterhuis',
        "json-nul-byte-after": VALID + b"\x00",
        "json-key-without-value": b'{"resourceType": "Patient", "gender"}',
        "json-xml-body": b'<Patient xmlns="http://hl7.org/fhir"><id value="pat-1"/></Patient>',
        "json-form-encoded": b"resourceType=Patient&family=Vermeulen-Oosterhuis",
    }
    for name, body in malformed.items():
        cases.append(Case(name, "parse", 400, "structure", body=body, secrets=SECRETS))
    not_objects = {
        "top-level-array": b"[" + VALID + b"]",
        "top-level-string": b'"Vermeulen-Oosterhuis"',
        "top-level-number": b"999911120",
        "top-level-null": b"null",
        "top-level-true": b"true",
    }
    for name, body in not_objects.items():
        cases.append(Case(name, "parse", 400, "structure", body=body, secrets=SECRETS))
    resource_types = {
        "resourcetype-missing": (b'{"type": "collection", "entry": []}', "required"),
        "resourcetype-number": (b'{"resourceType": 42, "type": "collection"}', "structure"),
        "resourcetype-null": (b'{"resourceType": null, "type": "collection"}', "required"),
        "resourcetype-empty": (b'{"resourceType": "", "type": "collection"}', "structure"),
        "resourcetype-object": (b'{"resourceType": {"value": "Bundle"}, "type": "collection"}', "structure"),
    }
    for name, (body, code) in resource_types.items():
        cases.append(Case(name, "parse", 400, code, expression="resourceType", body=body))
    duplicates = {
        "dup-key-top-level": b'{"resourceType": "Bundle", "type": "collection", "type": "transaction"}',
        "dup-key-resourcetype": b'{"resourceType": "Patient", "resourceType": "Bundle", "type": "batch"}',
        "dup-key-nested": VALID.replace(b'"gender": "female"', b'"gender": "female", "gender": "male"', 1),
        "dup-key-same-value": VALID.replace(
            b'"gender": "female"', b'"gender": "female", "gender": "female"', 1
        ),
        "dup-key-in-name": VALID.replace(
            b'"family": "Vermeulen-Oosterhuis"', b'"family": "Vermeulen-Oosterhuis", "family": "Jansen"', 1
        ),
        "dup-key-escaped-spelling": VALID.replace(
            b'"gender": "female"', b'"gender": "female", "gen\\u0064er": "male"', 1
        ),
        "dup-key-colon-escape-trick": VALID.replace(
            b'"gender": "female"', b'"gender": "female", "gender": "male", "_gender": {"id": "x\\u003ay"}', 1
        ),
    }
    for name, body in duplicates.items():
        cases.append(
            Case(
                name,
                "parse",
                400,
                "structure",
                body=body,
                secrets=SECRETS,
                note="FHIR JSON forbids duplicate properties; orjson would silently keep the last",
            )
        )
    numbers = {
        "number-overflow-double": (
            b'{"resourceType": "Observation", "valueQuantity": {"value": 1e400}}',
            "value",
        ),
        "number-overflow-negative": (
            b'{"resourceType": "Observation", "valueQuantity": {"value": -1e400}}',
            "value",
        ),
        "number-beyond-uint64": (
            b'{"resourceType": "Patient", "multipleBirthInteger": 18446744073709551616}',
            "value",
        ),
        "number-below-int64": (
            b'{"resourceType": "Patient", "multipleBirthInteger": -9223372036854775809}',
            "value",
        ),
        "number-400-digits": (
            b'{"resourceType": "Patient", "multipleBirthInteger": ' + b"9" * 400 + b"}",
            "value",
        ),
    }
    for name, (body, code) in numbers.items():
        cases.append(Case(name, "parse", 400, code, body=body))
    depth = [
        ("nesting-101-arrays", b'{"resourceType": "Bundle", "x": ' + b"[" * 100 + b"]" * 100 + b"}"),
        ("nesting-1025-arrays", b'{"resourceType": "Bundle", "x": ' + b"[" * 1024 + b"]" * 1024 + b"}"),
        ("nesting-200-extensions", _nested_extensions(200)),
    ]
    for name, body in depth:
        cases.append(Case(name, "parse", 400, "too-costly", body=body))
    cases += [
        Case("nesting-10000-arrays", "parse", 400, "too-costly", generated="deep-arrays:10000"),
        Case("nesting-10000-objects", "parse", 400, "too-costly", generated="deep-objects:10000"),
        Case("nesting-100000-arrays", "parse", 400, "too-costly", generated="deep-arrays:100000"),
        Case(
            "oversize-body",
            "parse",
            413,
            "too-costly",
            generated="oversize:11000000",
            secrets=SECRETS,
            note="one byte over max_bytes is enough; 11 MB against the 10 MiB default",
        ),
        Case("oversize-whitespace", "parse", 413, "too-costly", generated="whitespace:10485761"),
        Case(
            "huge-string-accepted",
            "validate",
            200,
            generated="huge-string:5000000",
            secrets=SECRETS,
            note="a 5 MB narrative is valid FHIR and within max_bytes",
        ),
        Case(
            "huge-array-empty-entries",
            "validate",
            422,
            "required",
            expression="Bundle.entry[0]",
            generated="empty-entries:100000",
            note="100,000 entries without resource; issues are capped",
        ),
        Case(
            "huge-array-names",
            "validate",
            200,
            generated="many-names:50000",
            secrets=SECRETS,
            note="50,000 names on a Patient: valid FHIR",
        ),
        Case("huge-integer-string", "parse", 400, "value", generated="huge-int:100000"),
    ]
    cases += _truncations()
    return cases


def _nested_extensions(depth: int) -> bytes:
    ext: dict[str, Any] = {"url": "http://example.org/leaf", "valueString": "Geertruida"}
    for _ in range(depth):
        ext = {"url": "http://example.org/level", "extension": [ext]}
    return json.dumps(bundle(patient(extension=[ext]))).encode()  # compact: indenting 200 levels is bulky


TRUNCATION_SOURCES = [
    "hl7-r4-examples/Patient-example.json",
    "hl7-r4-examples/Bundle-bundle-transaction.json",
    "dutch/nictiz-zib2024/nl-core-Patient-alt-1.json",
    "hl7-r4-examples/Observation-blood-pressure.json",
]
TRUNCATION_FRACTIONS = [0.01, 0.1, 0.25, 0.5, 0.75, 0.99]
LARGE_TRUNCATIONS = [
    "synthea/smart-generated-sample-data-r4/Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json",
    "synthea/fhir-data-pipes-synthea-hiv/Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json",
]


def _truncations() -> list[Case]:
    cases = []
    for rel in TRUNCATION_SOURCES:
        data = (CORPUS / rel).read_bytes()
        stem = Path(rel).stem.lower()
        secrets = _patient_secrets(json.loads(data))
        for fraction in TRUNCATION_FRACTIONS:
            cut = max(1, int(len(data) * fraction))
            cases.append(
                Case(
                    f"truncated-{stem}-{int(fraction * 100):02d}pct",
                    "parse",
                    400,
                    "structure",
                    body=data[:cut],
                    secrets=secrets,
                    note=f"{rel} cut at byte {cut}",
                )
            )
    for rel in LARGE_TRUNCATIONS:
        data = (CORPUS / rel).read_bytes()
        secrets = _patient_secrets(json.loads(data))
        for fraction in (0.33, 0.66, 0.999):
            cut = int(len(data) * fraction)
            cases.append(
                Case(
                    f"truncated-{Path(rel).stem.split('_')[0].lower()}-{int(fraction * 1000):03d}pm",
                    "parse",
                    400,
                    "structure",
                    generated=f"truncate:{rel}:{cut}",
                    secrets=secrets,
                )
            )
    return cases


def _patient_secrets(resource: dict) -> list[str]:
    """Distinctive values of the Patient(s) in a corpus file: identifiers and names."""
    found: list[str] = []
    patients = (
        [resource]
        if resource.get("resourceType") == "Patient"
        else [
            e["resource"]
            for e in resource.get("entry", [])
            if e.get("resource", {}).get("resourceType") == "Patient"
        ]
    )
    for p in patients:
        found += [i["value"] for i in p.get("identifier", []) if len(i.get("value", "")) >= 5]
        for name in p.get("name", []):
            found += [n for n in [name.get("family"), *name.get("given", [])] if n and len(n) >= 4]
    return sorted(set(found))


# --- validate layer --------------------------------------------------------------------------------


def validate_cases() -> list[Case]:
    obs = observation()
    cases = [
        Case("valid-transaction", "validate", 200, body=VALID, secrets=SECRETS),
        Case(
            "valid-batch", "validate", 200, body=dumps(bundle(patient(), obs, type="batch")), secrets=SECRETS
        ),
        Case(
            "valid-collection",
            "validate",
            200,
            body=dumps(bundle(patient(), obs, type="collection")),
            secrets=SECRETS,
        ),
    ]
    for btype in ("searchset", "document", "message", "history", "transaction-response", "batch-response"):
        body = dumps(bundle(patient(), obs, type=btype))
        cases.append(
            Case(
                f"bundle-type-{btype}",
                "validate",
                422,
                "not-supported",
                expression="Bundle.type",
                body=body,
                secrets=SECRETS,
            )
        )
    cases += [
        Case(
            "bundle-type-invalid-code",
            "validate",
            400,
            "code-invalid",
            expression="Bundle.type",
            body=dumps(bundle(patient(), obs, type="Transaction")),
            secrets=SECRETS,
        ),
        Case(
            "bundle-type-missing",
            "validate",
            400,
            "required",
            expression="Bundle.type",
            body=dumps({k: v for k, v in bundle(patient(), obs).items() if k != "type"}),
            secrets=SECRETS,
        ),
        Case(
            "not-a-bundle-patient",
            "validate",
            422,
            "not-supported",
            expression="resourceType",
            body=dumps(patient()),
            secrets=SECRETS,
        ),
        Case(
            "unknown-resourcetype-top",
            "validate",
            400,
            "not-supported",
            expression="resourceType",
            body=dumps({**patient(), "resourceType": "Patiënt"}),
            secrets=SECRETS,
        ),
        Case(
            "unknown-resourcetype-lowercase",
            "validate",
            400,
            "not-supported",
            expression="resourceType",
            body=dumps({**patient(), "resourceType": "patient"}),
            secrets=SECRETS,
        ),
        Case(
            "unknown-resourcetype-entry",
            "validate",
            400,
            "not-supported",
            expression="Bundle.entry[1].resource",
            body=dumps(bundle(patient(), {**obs, "resourceType": "Observatie"})),
            secrets=SECRETS,
        ),
        Case(
            "r5-only-resource-type",
            "validate",
            400,
            "not-supported",
            expression="Bundle.entry[1].resource",
            body=dumps(bundle(patient(), {"resourceType": "Transport", "status": "completed"})),
            secrets=SECRETS,
        ),
        Case(
            "entry-without-resource",
            "validate",
            422,
            "required",
            expression="Bundle.entry[1]",
            body=dumps(
                {
                    **bundle(patient()),
                    "entry": [
                        bundle(patient())["entry"][0],
                        {"request": {"method": "DELETE", "url": "Patient/pat-9"}},
                    ],
                }
            ),
            secrets=SECRETS,
        ),
        Case(
            "no-patient",
            "validate",
            422,
            "business-rule",
            expression="Bundle.entry",
            body=dumps(
                bundle(
                    observation(subject="urn:uuid:7f3a0c1e-0000-4000-8000-000000000009"),
                    type="collection",
                    urls=["urn:uuid:7f3a0c1e-0000-4000-8000-000000000002"],
                )
            ),
            note="the Observation's urn reference dangles too; both are reported",
        ),
        Case(
            "empty-bundle",
            "validate",
            422,
            "business-rule",
            expression="Bundle.entry",
            body=dumps({"resourceType": "Bundle", "type": "transaction"}),
        ),
        Case(
            "two-patients-accepted",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(bundle(patient(), observation(), patient(id="pat-2"), observation(subject=url(3)))),
            note="each Patient is checked and pseudonymised on its own",
        ),
        Case(
            "three-patients-shared-practitioner",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    patient(id="pat-2"),
                    patient(id="pat-3"),
                    {"resourceType": "Practitioner", "name": [{"family": "Dokter"}]},
                    observation(performer=[{"reference": url(4)}]),
                    observation(subject=url(2), performer=[{"reference": url(4)}]),
                )
            ),
        ),
        Case(
            "duplicate-fullurl",
            "validate",
            422,
            "duplicate",
            expression="Bundle.entry[2].fullUrl",
            body=dumps(bundle(patient(), obs, observation(), urls=[url(1), url(2), url(2)])),
            secrets=SECRETS,
        ),
        Case(
            "duplicate-fullurl-two-patients",
            "validate",
            422,
            "duplicate",
            expression="Bundle.entry[1].fullUrl",
            body=dumps(bundle(patient(), patient(id="pat-2"), urls=[url(1), url(1)])),
            secrets=SECRETS,
        ),
        Case(
            "two-patients-one-id",
            "validate",
            422,
            "duplicate",
            expression="Bundle.entry[2].resource.id",
            note="two people under one id: their pseudonymised ids would follow the entry order, and a "
            "re-post in another order swapped them at the registry",
            body=dumps(bundle(patient(), observation(), patient(name=[{"family": "Aalbersberg"}]))),
            secrets=SECRETS,
        ),
        Case(
            "two-observations-one-id-other-servers",
            "validate",
            422,
            "duplicate",
            expression="Bundle.entry[2].resource.id",
            body=dumps(
                bundle(
                    patient(),
                    observation(id="14"),
                    observation(id="14"),
                    urls=[url(1), "http://a.example/fhir/Observation/14", "http://b.example/fhir/Observation/14"],
                )
            ),
            secrets=SECRETS,
        ),
        Case(
            "dangling-relative-patient",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(bundle(patient(), observation(subject="Patient/other-patient"))),
            secrets=SECRETS,
        ),
        Case(
            "dangling-urn-patient",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(bundle(patient(), observation(subject=url(99)))),
            secrets=SECRETS,
        ),
        Case(
            "dangling-urn-encounter",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.encounter.reference",
            body=dumps(bundle(patient(), observation(encounter={"reference": url(98)}))),
            secrets=SECRETS,
        ),
        Case(
            "dangling-patient-other-server",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(
                bundle(patient(), observation(subject="https://other-ehr.example.org/fhir/Patient/77"))
            ),
            secrets=SECRETS,
        ),
        Case(
            "dangling-patient-history",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(bundle(patient(), observation(subject="Patient/pat-77/_history/3"))),
            secrets=SECRETS,
        ),
        Case(
            "dangling-conditional-patient",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(bundle(patient(), observation(subject=f"Patient?identifier={BSN}|999999990"))),
            secrets=SECRETS,
        ),
        Case(
            "conditional-patient-by-name",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            body=dumps(bundle(patient(), observation(subject="Patient?name=Vermeulen-Oosterhuis"))),
            secrets=SECRETS,
            note="only identifier= can be resolved inside the Bundle",
        ),
        Case(
            "dangling-logical-bsn",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject",
            body=dumps(
                bundle(patient(), {**obs, "subject": {"identifier": {"system": BSN, "value": "999999990"}}})
            ),
            secrets=SECRETS,
        ),
        Case(
            "resolved-conditional-patient",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(bundle(patient(), observation(subject=f"Patient?identifier={BSN}|999911120"))),
        ),
        Case(
            "resolved-logical-bsn",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    {
                        **obs,
                        "subject": {"identifier": {"system": BSN, "value": "999911120"}, "type": "Patient"},
                    },
                )
            ),
        ),
        Case(
            "resolved-relative-by-id",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(bundle(patient(), observation(subject="Patient/pat-1"), type="collection")),
        ),
        Case(
            "resolved-restful-history",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    observation(subject="Patient/pat-1/_history/2"),
                    type="collection",
                    urls=[
                        "https://ehr.example.nl/fhir/Patient/pat-1",
                        "https://ehr.example.nl/fhir/Observation/o1",
                    ],
                )
            ),
        ),
        Case(
            "relative-against-other-base",
            "validate",
            422,
            "not-found",
            expression="Bundle.entry[1].resource.subject.reference",
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    observation(subject="Patient/pat-1"),
                    type="collection",
                    urls=[
                        "https://ehr.example.nl/fhir/Patient/pat-1",
                        "https://lab.example.nl/fhir/Observation/o1",
                    ],
                )
            ),
            note="FHIR resolves Patient/pat-1 against the Observation's base: a Patient on the lab server",
        ),
        Case(
            "circular-encounter-condition",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    encounter(diagnosis=[{"condition": {"reference": url(3)}}]),
                    {
                        "resourceType": "Condition",
                        "subject": {"reference": url(1)},
                        "encounter": {"reference": url(2)},
                        "code": {"text": "hypertensie"},
                    },
                )
            ),
        ),
        Case(
            "circular-self-reference",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(bundle(patient(), observation(hasMember=[{"reference": url(2)}]))),
        ),
        Case(
            "circular-patient-link",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(link=[{"other": {"reference": url(2)}, "type": "seealso"}]),
                    patient(id="pat-2", link=[{"other": {"reference": url(1)}, "type": "seealso"}]),
                )
            ),
        ),
        Case(
            "reference-other-server-practitioner",
            "validate",
            200,
            warning="business-rule",
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    observation(performer=[{"reference": "https://other.example.org/fhir/Practitioner/99"}]),
                )
            ),
        ),
        Case(
            "reference-unresolved-organization",
            "validate",
            200,
            warning="business-rule",
            secrets=SECRETS,
            body=dumps(bundle(patient(managingOrganization={"reference": "Organization/ziekenhuis-1"}))),
        ),
        Case(
            "reference-conditional-organization",
            "validate",
            200,
            warning="business-rule",
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(
                        managingOrganization={
                            "reference": "Organization?identifier=http://fhir.nl/fhir/NamingSystem/ura|00001234"
                        }
                    )
                )
            ),
        ),
        Case(
            "contained-patient",
            "validate",
            422,
            "business-rule",
            expression="Bundle.entry[1].resource.contained[0]",
            secrets=SECRETS,
            body=dumps(
                bundle(patient(), {**observation(subject="#p1"), "contained": [{**patient(), "id": "p1"}]})
            ),
        ),
        Case(
            "contained-patient-only",
            "validate",
            422,
            "business-rule",
            secrets=SECRETS,
            expression="Bundle.entry[0].resource.contained[0]",
            body=dumps(bundle({**observation(subject="#p1"), "contained": [{**patient(), "id": "p1"}]})),
        ),
        Case(
            "contained-relatedperson-accepted",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    {
                        **observation(performer=[{"reference": "#rp"}]),
                        "contained": [
                            {"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": url(1)}}
                        ],
                    },
                )
            ),
        ),
        Case(
            "nested-bundle-with-patient",
            "validate",
            422,
            "business-rule",
            expression="Bundle.entry[1].resource",
            secrets=SECRETS,
            body=dumps(bundle(patient(), bundle(patient(id="pat-9"), type="collection"), type="collection")),
        ),
        Case(
            "parameters-with-patient",
            "validate",
            422,
            "business-rule",
            expression="Bundle.entry[1].resource",
            secrets=SECRETS,
            body=dumps(
                bundle(
                    patient(),
                    {
                        "resourceType": "Parameters",
                        "parameter": [{"name": "p", "resource": patient(id="pat-9")}],
                    },
                )
            ),
        ),
        Case(
            "patient-without-name-birthdate",
            "validate",
            200,
            secrets=["999911120"],
            body=dumps(bundle(patient(name=None, birthDate=None))),
            note="valid FHIR: accepted; pseudonym types needing name/birthDate are skipped downstream",
        ),
        Case(
            "patient-only-identifier",
            "validate",
            200,
            body=dumps(
                bundle(
                    {
                        "resourceType": "Patient",
                        "identifier": [{"system": MRN_SYSTEM, "value": "MRN-7734421"}],
                    }
                )
            ),
        ),
        Case("patient-empty", "validate", 200, body=dumps(bundle({"resourceType": "Patient"}))),
        Case(
            "patient-partial-birthdate",
            "validate",
            200,
            secrets=SECRETS,
            body=dumps(bundle(patient(birthDate="1961"))),
        ),
        Case(
            "patient-birthdate-month-13",
            "validate",
            400,
            "value",
            expression="Bundle.entry[0].resource.birthDate",
            secrets=SECRETS,
            body=dumps(bundle(patient(birthDate="1961-13-23"))),
        ),
        Case(
            "patient-birthdate-dutch-format",
            "validate",
            400,
            "value",
            expression="Bundle.entry[0].resource.birthDate",
            secrets=SECRETS,
            body=dumps(bundle(patient(birthDate="23-07-1961"))),
        ),
        Case(
            "patient-birthdate-datetime",
            "validate",
            400,
            "value",
            expression="Bundle.entry[0].resource.birthDate",
            secrets=SECRETS,
            body=dumps(bundle(patient(birthDate="1961-07-23T00:00:00Z"))),
        ),
        Case(
            "patient-gender-code-m",
            "validate",
            400,
            "code-invalid",
            expression="Bundle.entry[0].resource.gender",
            secrets=SECRETS,
            body=dumps(bundle(patient(gender="M"))),
        ),
        Case(
            "patient-gender-number",
            "validate",
            400,
            "code-invalid",
            expression="Bundle.entry[0].resource.gender",
            secrets=SECRETS,
            body=dumps(bundle(patient(gender=1))),
        ),
        Case(
            "patient-name-object-not-array",
            "validate",
            400,
            "structure",
            expression="Bundle.entry[0].resource.name",
            secrets=SECRETS,
            body=dumps(bundle(patient(name={"family": "Vermeulen-Oosterhuis"}))),
        ),
        Case(
            "patient-active-string",
            "validate",
            400,
            "structure",
            expression="Bundle.entry[0].resource.active",
            secrets=SECRETS,
            body=dumps(bundle(patient(active="true"))),
        ),
        Case(
            "patient-empty-string-family",
            "validate",
            400,
            "value",
            secrets=["999911120"],
            expression="Bundle.entry[0].resource.name[0].family",
            body=dumps(bundle(patient(name=[{"family": ""}]))),
        ),
        Case(
            "patient-id-too-long",
            "validate",
            400,
            "value",
            expression="Bundle.entry[0].resource.id",
            secrets=SECRETS,
            body=dumps(bundle(patient(id="x" * 65))),
        ),
        Case(
            "patient-multiplebirth-out-of-int32",
            "validate",
            400,
            "value",
            secrets=SECRETS,
            expression="Bundle.entry[0].resource.multipleBirthInteger",
            body=dumps(bundle(patient(multipleBirthInteger=2**40))),
        ),
        Case(
            "patient-multiplebirth-fraction",
            "validate",
            400,
            "structure",
            secrets=SECRETS,
            expression="Bundle.entry[0].resource.multipleBirthInteger",
            body=dumps(bundle(patient(multipleBirthInteger=1.5))),
        ),
        Case(
            "observation-missing-code",
            "validate",
            400,
            "required",
            secrets=SECRETS,
            expression="Bundle.entry[1].resource.code",
            body=dumps(bundle(patient(), {k: v for k, v in obs.items() if k != "code"})),
        ),
        Case(
            "encounter-missing-class",
            "validate",
            400,
            "required",
            secrets=SECRETS,
            expression="Bundle.entry[1].resource.class",
            body=dumps(bundle(patient(), {k: v for k, v in encounter().items() if k != "class"})),
        ),
        Case(
            "unknown-element-misspelt",
            "validate",
            400,
            "structure",
            secrets=SECRETS,
            expression="Bundle.entry[0].resource.birthdate",
            body=dumps(bundle(patient(birthDate=None, birthdate="1961-07-23"))),
        ),
        Case(
            "unknown-element-not-echoed",
            "validate",
            400,
            "structure",
            secrets=SECRETS + ["Oosterhuis999911120"],
            expression="Bundle.entry[0].resource",
            body=dumps(bundle({**patient(), "Oosterhuis999911120": True})),
            note="a property name that does not look like a FHIR element is not named in the error",
        ),
    ]
    cases += _version_cases()
    cases += _placeholder_cases()
    cases += _corpus_cases()
    return cases


def _version_cases() -> list[Case]:
    """R5 and STU3 content: elements that do not exist in R4 fail `additionalProperties: false`."""
    obs = observation()
    r5 = {
        "r5-observation-triggeredby": (
            {**obs, "triggeredBy": [{"observation": {"reference": url(1)}, "type": "reflex"}]},
            "triggeredBy",
        ),
        "r5-encounter-actualperiod": (encounter(actualPeriod={"start": "2026-01-02"}), "actualPeriod"),
        "r5-medicationrequest-medication": (
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": PATIENT_URL},
                "medication": {"concept": {"text": "paracetamol"}},
            },
            "medication",
        ),
        "r5-consent-decision": (
            {
                "resourceType": "Consent",
                "status": "active",
                "decision": "deny",
                "subject": {"reference": PATIENT_URL},
            },
            "decision",
        ),
        "r5-condition-participant": (
            {
                "resourceType": "Condition",
                "subject": {"reference": PATIENT_URL},
                "participant": [{"actor": {"reference": PATIENT_URL}}],
            },
            "participant",
        ),
    }
    stu3 = {
        "stu3-observation-context": ({**obs, "context": {"reference": url(1)}}, "context"),
        "stu3-condition-asserteddate": (
            {
                "resourceType": "Condition",
                "subject": {"reference": PATIENT_URL},
                "assertedDate": "2017-01-01",
            },
            "assertedDate",
        ),
        "stu3-patient-animal": (None, "animal"),
        "stu3-consent-period-except": (
            {
                "resourceType": "Consent",
                "status": "active",
                "patient": {"reference": PATIENT_URL},
                "period": {"start": "2017-01-01"},
                "except": [{"type": "deny"}],
            },
            "period",
        ),
        "stu3-procedure-definition": (
            {
                "resourceType": "Procedure",
                "status": "completed",
                "subject": {"reference": PATIENT_URL},
                "definition": [{"reference": "PlanDefinition/x"}],
            },
            "definition",
        ),
    }
    cases = []
    for name, (resource, element) in {**r5, **stu3}.items():
        if resource is None:
            body = dumps(bundle(patient(animal={"species": {"text": "dog"}})))
            where = f"Bundle.entry[0].resource.{element}"
        else:
            body = dumps(bundle(patient(), resource))
            where = f"Bundle.entry[1].resource.{element}"
        cases.append(Case(name, "validate", 400, "structure", expression=where, body=body, secrets=SECRETS))
    cases.append(
        Case(
            "r5-encounter-class-array",
            "validate",
            400,
            "structure",
            secrets=SECRETS,
            expression="Bundle.entry[1].resource.class",
            body=dumps(bundle(patient(), {**encounter(), "class": [{"coding": [{"code": "IMP"}]}]})),
        )
    )
    cases.append(
        Case(
            "stu3-dstu2-bundle-entry-status",
            "validate",
            400,
            "structure",
            secrets=SECRETS,
            expression="Bundle.entry[0].transaction",
            body=dumps(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {"fullUrl": PATIENT_URL, "resource": patient(), "transaction": {"method": "POST"}}
                    ],
                }
            ),
        )
    )
    return cases


DUTCH_DIR = "dutch/nictiz-zib2024"
DUTCH_BASE = "https://ehr.example.nl/fhir"


def dutch_bundle() -> dict:
    """All nl-core zib2024 examples in one collection Bundle with RESTful fullUrls (they refer to each other
    as Type/id, and the Patient and its RelatedPerson refer to each other)."""
    resources = [json.loads(p.read_bytes()) for p in sorted((CORPUS / DUTCH_DIR).glob("*.json"))]
    resources.sort(key=lambda r: r["resourceType"] != "Patient")
    urls: list[str | None] = [f"{DUTCH_BASE}/{r['resourceType']}/{r['id']}" for r in resources]
    return bundle(*resources, type="collection", urls=urls)


def _entry_of(b: dict, rtype: str, rid: str | None = None) -> int:
    return next(
        i
        for i, e in enumerate(b["entry"])
        if e["resource"]["resourceType"] == rtype and (rid is None or e["resource"]["id"] == rid)
    )


PLACEHOLDER_TARGETS = [
    ("Patient", None, ["birthDate"]),
    ("Patient", None, ["deceasedDateTime"]),
    ("Observation", "nl-core-BloodPressure-alt-1", ["effectiveDateTime"]),
    ("Observation", "nl-core-O2Saturation-alt-1", ["effectiveDateTime"]),
    ("Encounter", None, ["period", "start"]),
    ("Encounter", None, ["period", "end"]),
    ("EpisodeOfCare", None, ["period", "start"]),
    ("Condition", "nl-core-Problem-alt-1", ["onsetDateTime"]),
    ("Condition", "nl-core-Problem-alt-2", ["abatementDateTime"]),
    ("NutritionOrder", None, ["dateTime"]),
]


def _placeholder_cases() -> list[Case]:
    """Touchstone-style `${DATE, T, D, -60}` instead of dates, as in Nictiz conformance fixtures."""
    base = dutch_bundle()
    secrets = _patient_secrets(base)
    cases = [
        Case(
            "dutch-nlcore-collection",
            "validate",
            200,
            body=dumps(base),
            secrets=secrets,
            warning="business-rule",
            note="all nl-core zib2024 examples; unresolved Location/PractitionerRole references are warnings",
        )
    ]
    for rtype, rid, path in PLACEHOLDER_TARGETS:
        # Small Bundles (the Patient plus the one changed resource) keep the files small.
        keep = {0, _entry_of(base, rtype, rid)}
        b = copy.deepcopy({**base, "entry": [e for i, e in enumerate(base["entry"]) if i in keep]})
        i = len(b["entry"]) - 1
        node = b["entry"][i]["resource"]
        for step in path[:-1]:
            node = node[step]
        if path[-1] not in node:
            raise SystemExit(f"corpus changed: {rtype} has no {'.'.join(path)}")
        node[path[-1]] = PLACEHOLDER
        where = f"Bundle.entry[{i}].resource." + ".".join(path)
        tag = (rid or rtype).replace("nl-core-", "").lower()
        cases.append(
            Case(
                f"placeholder-{tag}-{'-'.join(path).lower()}",
                "validate",
                400,
                "value",
                expression=where,
                body=dumps(b),
                secrets=secrets,
            )
        )
    b = copy.deepcopy(base)
    b["entry"][1]["fullUrl"] = "${DATE, T, D, -60}"
    cases.append(
        Case(
            "placeholder-fullurl-with-spaces",
            "validate",
            400,
            "value",
            expression="Bundle.entry[1].fullUrl",
            body=dumps(b),
            secrets=secrets,
        )
    )
    b = copy.deepcopy(base)
    b["entry"][1]["fullUrl"] = "${BASE}/Condition/${ID}"
    cases.append(
        Case(
            "placeholder-fullurl-no-spaces",
            "validate",
            200,
            warning="business-rule",
            body=dumps(b),
            secrets=secrets,
            note="a valid uri for the schema; the Encounter's reference to this "
            "Condition no longer resolves and is reported as a warning",
        )
    )
    return cases


def _corpus_cases() -> list[Case]:
    cases = [
        Case(
            "corpus-hl7-bundle-references",
            "validate",
            422,
            "duplicate",
            expression="Bundle.entry[8].fullUrl",
            generated="corpus:hl7-r4-examples/Bundle-bundle-references.json",
            note="same fullUrl twice (two versions) and a Patient on another server",
        ),
        Case(
            "corpus-hl7-bundle-searchset",
            "validate",
            422,
            "not-supported",
            expression="Bundle.type",
            generated="corpus:hl7-r4-examples/Bundle-bundle-example.json",
        ),
        Case(
            "corpus-hl7-bundle-transaction-delete",
            "validate",
            422,
            "required",
            expression="Bundle.entry[5]",
            generated="corpus:hl7-r4-examples/Bundle-bundle-transaction.json",
            note="DELETE/GET entries carry no resource",
        ),
        Case(
            "corpus-hl7-document",
            "validate",
            422,
            "not-supported",
            expression="Bundle.type",
            generated="corpus:hl7-r4-examples/Bundle-father.json",
        ),
    ]
    for rel in sorted((CORPUS / "synthea").rglob("*.json")):
        rel_path = rel.relative_to(CORPUS).as_posix()
        warning = "business-rule" if "hiv" in rel_path else None
        cases.append(
            Case(
                f"corpus-synthea-{rel.stem.split('_')[0].lower()}",
                "validate",
                200,
                generated=f"corpus:{rel_path}",
                warning=warning,
                secrets=_patient_secrets(json.loads(rel.read_bytes())),
            )
        )
    return cases


# --- opt-out layer: Consents in the posted Bundle --------------------------------------------------


def consent(
    provision: dict | None = None,
    *,
    status: str = "active",
    scope: str = "research",
    patient_ref: str | None = PATIENT_URL,
    **extra: Any,
) -> dict:
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "status": status,
        "scope": {"coding": [{"system": SCOPE, "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "dateTime": "2025-03-01T10:00:00+01:00",
    }
    if patient_ref is not None:
        resource["patient"] = {"reference": patient_ref}
    if provision is not None:
        resource["provision"] = provision
    resource.update(extra)
    return resource


def purpose(*codes: str) -> list[dict]:
    return [{"system": ACT_REASON, "code": c} for c in codes]


def actor_ura(value: str) -> list[dict]:
    return [
        {
            "role": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
                ]
            },
            "reference": {"identifier": {"system": URA, "value": value}},
        }
    ]


NOW_COVERED = {"start": "2000-01-01", "end": "2099-12-31"}
EXPIRED = {"start": "2001-01-01T00:00:00+01:00", "end": "2002-12-31T23:59:59+01:00"}
FUTURE = {"start": "2098-01-01", "end": "2099-12-31"}


def optout_cases() -> list[Case]:
    deny, permit = {"type": "deny"}, {"type": "permit"}
    shapes: list[tuple[str, list[dict], str]] = [
        ("deny-all-research", [consent(deny)], "objected"),
        ("deny-all-patient-privacy", [consent(deny, scope="patient-privacy")], "objected"),
        ("deny-purpose-hqualimp", [consent({**deny, "purpose": purpose("HQUALIMP")})], "objected"),
        ("deny-purpose-hresch", [consent({**deny, "purpose": purpose("HRESCH")})], "objected"),
        ("deny-purpose-marketing-only", [consent({**deny, "purpose": purpose("HMARKT")})], "allowed"),
        (
            "deny-purpose-marketing-and-hqualimp",
            [consent({**deny, "purpose": purpose("HMARKT", "HQUALIMP")})],
            "objected",
        ),
        ("deny-period-covers-now", [consent({**deny, "period": NOW_COVERED})], "objected"),
        ("deny-period-expired", [consent({**deny, "period": EXPIRED})], "allowed"),
        ("deny-period-future", [consent({**deny, "period": FUTURE})], "allowed"),
        ("deny-period-open-end", [consent({**deny, "period": {"start": "2010-05-01"}})], "objected"),
        ("deny-period-open-start", [consent({**deny, "period": {"end": "2099-01"}})], "objected"),
        (
            "deny-period-partial-years",
            [consent({**deny, "period": {"start": "2000", "end": "2099"}})],
            "objected",
        ),
        ("deny-period-ended-partial-year", [consent({**deny, "period": {"end": "2001"}})], "allowed"),
        ("deny-actor-registry-identifier", [consent({**deny, "actor": actor_ura(REGISTRY_URA)})], "objected"),
        (
            "deny-actor-registry-reference",
            [
                consent(
                    {
                        **deny,
                        "actor": [
                            {
                                "role": {"text": "ontvanger"},
                                "reference": {"reference": "Organization/registry-dica"},
                            }
                        ],
                    }
                )
            ],
            "objected",
        ),
        ("deny-actor-other-organisation", [consent({**deny, "actor": actor_ura("00005555")})], "allowed"),
        (
            "deny-actor-other-but-policy-names-registry",
            [
                consent(
                    {**deny, "actor": actor_ura("00005555")},
                    policy=[{"uri": "https://registry.example.nl/policy/dica-optout"}],
                )
            ],
            "objected",
        ),
        (
            "permit-with-nested-deny-hqualimp",
            [consent({**permit, "provision": [{**deny, "purpose": purpose("HQUALIMP")}]})],
            "objected",
        ),
        (
            "permit-with-nested-deny-marketing",
            [consent({**permit, "provision": [{**deny, "purpose": purpose("HMARKT")}]})],
            "allowed",
        ),
        (
            "permit-with-nested-deny-expired",
            [consent({**permit, "provision": [{**deny, "period": EXPIRED}]})],
            "allowed",
        ),
        (
            "deny-with-nested-permit-all-purposes",
            [consent({**deny, "provision": [{**permit, "purpose": purpose("HQUALIMP", "HRESCH")}]})],
            "allowed",
        ),
        (
            "deny-with-nested-permit-one-purpose",
            [consent({**deny, "provision": [{**permit, "purpose": purpose("HQUALIMP")}]})],
            "objected",
        ),
        (
            "deny-nested-permit-nested-deny",
            [
                consent(
                    {
                        **deny,
                        "provision": [{**permit, "provision": [{**deny, "actor": actor_ura(REGISTRY_URA)}]}],
                    }
                )
            ],
            "objected",
        ),
        (
            "permit-nested-deny-nested-permit-registry",
            [
                consent(
                    {
                        **permit,
                        "provision": [
                            {
                                **deny,
                                "purpose": purpose("HQUALIMP"),
                                "provision": [{**permit, "actor": actor_ura(REGISTRY_URA)}],
                            }
                        ],
                    }
                )
            ],
            "allowed",
        ),
        (
            "typeless-top-with-nested-deny",
            [consent({"provision": [{**deny, "purpose": purpose("HRESCH")}]})],
            "objected",
        ),
        # no type and no policyRule: no rule at all (R4 wants a policy or a policyRule), unknown (a probe)
        ("typeless-top-only", [consent({"period": NOW_COVERED})], "unknown"),
        ("permit-only", [consent(permit)], "allowed"),
        (
            "permit-purpose-hqualimp",
            [consent({**permit, "purpose": purpose("HQUALIMP", "HRESCH")})],
            "allowed",
        ),
        ("deny-inactive", [consent(deny, status="inactive")], "allowed"),
        ("deny-draft", [consent(deny, status="draft")], "allowed"),
        ("deny-proposed", [consent(deny, status="proposed")], "allowed"),
        ("deny-rejected", [consent(deny, status="rejected")], "allowed"),
        ("deny-entered-in-error", [consent(deny, status="entered-in-error")], "allowed"),
        ("deny-scope-treatment", [consent(deny, scope="treatment")], "allowed"),
        ("deny-scope-adr", [consent(deny, scope="adr")], "allowed"),
        ("deny-scope-local-code", [consent(deny, scope="registratiebezwaar")], "objected"),
        (
            "policyrule-optout",
            [
                consent(
                    None,
                    policyRule={
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}
                        ]
                    },
                )
            ],
            "objected",
        ),
        (
            "policyrule-optin",
            [
                consent(
                    None,
                    policyRule={
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
                        ]
                    },
                )
            ],
            "allowed",
        ),
        ("no-provision-no-rule", [consent(None)], "unknown"),
        (
            "policyrule-local-code",
            [
                consent(
                    None,
                    policyRule={
                        "coding": [
                            {"system": "https://hospital.example.nl/consent", "code": "GEEN-REGISTRATIE"}
                        ]
                    },
                )
            ],
            "unknown",
        ),
        (
            "deny-data-restricted",
            [consent({**deny, "data": [{"meaning": "related", "reference": {"reference": url(2)}}]})],
            "objected",
        ),
        (
            "deny-dataperiod-restricted",
            [consent({**deny, "dataPeriod": {"start": "2020-01-01"}})],
            "objected",
        ),
        (
            "deny-class-restricted",
            [
                consent(
                    {
                        **deny,
                        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
                    }
                )
            ],
            "objected",
        ),
        ("consent-without-patient-deny", [consent(deny, patient_ref=None)], "unknown"),
        ("consent-without-patient-permit", [consent(permit, patient_ref=None)], "allowed"),
        ("permit-and-deny-consents", [consent(permit), consent(deny)], "objected"),
        ("deny-and-unparseable", [consent(deny), consent(None)], "objected"),
        (
            "two-deny-not-applicable",
            [
                consent(
                    {
                        **permit,
                        "provision": [{**deny, "purpose": purpose("HMARKT")}, {**deny, "period": EXPIRED}],
                    }
                )
            ],
            "allowed",
        ),
        (
            "deny-conditional-patient",
            [consent(deny, patient_ref=f"Patient?identifier={BSN}|999911120")],
            "objected",
        ),
        ("deny-relative-patient-id", [consent(deny, patient_ref="Patient/pat-1")], "objected"),
        (
            "zib-treatment-directive",
            [
                consent(
                    {
                        **deny,
                        "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "89666000"}]}],
                    },
                    scope="treatment",
                )
            ],
            "allowed",
        ),
    ]
    cases = []
    for name, consents, decision in shapes:
        body = dumps(bundle(patient(), observation(), *consents))
        cases.append(Case(f"consent-{name}", "optout", 200, body=body, optout=decision, secrets=SECRETS))
    other = patient(id="pat-2", identifier=[{"system": MRN_SYSTEM, "value": "MRN-7734422"}])
    two = bundle(patient(), other, consent({"type": "deny"}, patient_ref=url(2)))
    cases.append(
        Case(
            "consent-two-patients-one-objects",
            "optout",
            200,
            body=dumps(two),
            secrets=SECRETS,
            optout={url(1): "allowed", url(2): "objected"},
        )
    )
    # two records with the same BSN are one person (the same pseudonyms): the objection holds for both
    same = bundle(patient(), patient(id="pat-2"), consent({"type": "deny"}, patient_ref=url(2)))
    cases.append(
        Case(
            "consent-two-records-of-one-person",
            "optout",
            200,
            body=dumps(same),
            secrets=SECRETS,
            optout={url(1): "objected", url(2): "objected"},
        )
    )
    cases.append(Case("consent-no-consent", "optout", 200, body=VALID, optout="allowed", secrets=SECRETS))
    invalid = [
        ("consent-provision-type-invalid", consent({"type": "maybe"}), "code-invalid", "provision.type"),
        (
            "consent-period-placeholder",
            consent({"type": "deny", "period": {"start": PLACEHOLDER}}),
            "value",
            "provision.period.start",
        ),
        (
            "consent-missing-scope",
            {k: v for k, v in consent({"type": "deny"}).items() if k != "scope"},
            "required",
            "scope",
        ),
        (
            "consent-actor-without-reference",
            consent({"type": "deny", "actor": [{"role": {"text": "x"}}]}),
            "required",
            "provision.actor[0].reference",
        ),
        ("consent-status-invalid", consent({"type": "deny"}, status="actief"), "code-invalid", "status"),
    ]
    for name, resource, code, where in invalid:
        cases.append(
            Case(
                name,
                "validate",
                400,
                code,
                expression=f"Bundle.entry[2].resource.{where}",
                body=dumps(bundle(patient(), observation(), resource)),
                secrets=SECRETS,
            )
        )
    return cases


# --- HTTP layer: only the content type is wrong ----------------------------------------------------


def http_cases() -> list[Case]:
    wrong = {
        "ct-text-plain": "text/plain",
        "ct-application-xml": "application/xml",
        "ct-fhir-xml": "application/fhir+xml",
        "ct-form-urlencoded": "application/x-www-form-urlencoded",
        "ct-multipart": "multipart/form-data; boundary=x",
        "ct-octet-stream": "application/octet-stream",
        "ct-json-patch": "application/json-patch+json",
        "ct-charset-utf16": "application/fhir+json; charset=utf-16",
        "ct-charset-latin1": "application/fhir+json; charset=iso-8859-1",
        "ct-fhirversion-stu3": "application/fhir+json; fhirVersion=3.0",
        "ct-missing": "",
    }
    cases = [
        Case(name, "http", 415, "not-supported", body=VALID, content_type=ct, secrets=SECRETS)
        for name, ct in wrong.items()
    ]
    ok = {
        "ct-application-json": "application/json",
        "ct-fhir-json-charset-utf8": "application/fhir+json; charset=UTF-8",
        "ct-fhir-json-fhirversion-4": "application/fhir+json; fhirVersion=4.0",
        "ct-fhir-json-uppercase": "Application/FHIR+JSON",
    }
    cases += [
        Case(name, "http", 200, body=VALID, content_type=ct, secrets=SECRETS) for name, ct in ok.items()
    ]
    return cases


def all_cases() -> list[Case]:
    cases = parse_cases() + validate_cases() + optout_cases() + http_cases()
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"duplicate case names: {sorted(duplicates)}")
    return cases


# --- bodies generated at test time -----------------------------------------------------------------


def generated_body(spec: str) -> bytes:
    """Expand a `generated:` spec from cases.yaml into the body bytes."""
    kind, _, arg = spec.partition(":")
    if kind == "deep-arrays":
        n = int(arg)
        return b'{"resourceType": "Bundle", "type": "collection", "x": ' + b"[" * n + b"]" * n + b"}"
    if kind == "deep-objects":
        n = int(arg)
        return (
            b'{"resourceType": "Bundle", "type": "collection", "x": ' + b'{"a":' * n + b"1" + b"}" * n + b"}"
        )
    if kind == "oversize":
        body = VALID[:-1] + b', "padding": "'
        return body + b"x" * (int(arg) - len(body) - 2) + b'"}'
    if kind == "whitespace":
        return VALID + b" " * (int(arg) - len(VALID))
    if kind == "huge-string":
        div = '<div xmlns="http://www.w3.org/1999/xhtml">' + "Lorem ipsum " * (int(arg) // 12) + "</div>"
        return dumps(bundle(patient(text={"status": "generated", "div": div})))
    if kind == "empty-entries":
        return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{}] * int(arg)}).encode()
    if kind == "many-names":
        names = [{"family": f"Naam{i}"} for i in range(int(arg))]
        return dumps(bundle(patient(name=[*patient()["name"], *names])))
    if kind == "huge-int":
        return b'{"resourceType": "Patient", "multipleBirthInteger": ' + b"7" * int(arg) + b"}"
    if kind == "truncate":
        rel, _, cut = arg.rpartition(":")
        return (CORPUS / rel).read_bytes()[: int(cut)]
    if kind == "corpus":
        return (CORPUS / arg).read_bytes()
    raise ValueError(f"unknown generated spec kind: {kind}")


HEADER = """\
# Bad-input collection for the FHIR delivery gateway.
# GENERATED by tests/badinput/generate.py: edit that and re-run it, do not edit this file.
#
# Per case:
#   body          file in this folder with the raw request body (*.json = valid JSON, *.body = anything else),
#                 or null with `generated`: a spec expanded by generate.generated_body() (large bodies)
#   content_type  the Content-Type to send
#   status        expected HTTP status; 200 = accepted by parse/validate (for `optout` cases the gateway then
#                 drops objected/unknown patients; the HTTP answer for that is the service's choice)
#   code          expected OperationOutcome issue code (null when accepted)
#   expression    a FHIRPath expression that one issue with that code must carry (optional)
#   warning       accepted, but with a warning issue of this code (optional)
#   layer         parse | validate | optout | http: the first layer that decides
#   optout        expected Decision.status per patient (a single value = the one/first Patient; or a map by
#                 fullUrl), evaluated with `defaults.optout_policy` and the wall clock (periods are chosen to
#                 stay valid until 2097)
#   secrets       values in the body that must never appear in the response (OperationOutcome, headers, logs)
"""


def main() -> None:
    cases = all_cases()
    written = set()
    for case in cases:
        name = case.file_name()
        if name:
            (HERE / name).write_bytes(case.body)  # type: ignore[arg-type]
            written.add(name)
    for stale in [*HERE.glob("*.body"), *HERE.glob("*.json")]:
        if stale.name not in written:
            stale.unlink()
    document = {"defaults": DEFAULTS, "cases": [c.as_yaml() for c in cases]}
    text = HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=110)
    (HERE / "cases.yaml").write_text(text, encoding="utf-8")
    print(f"{len(cases)} cases, {len(written)} body files", file=sys.stderr)


if __name__ == "__main__":
    main()
