"""SchemaValidator (official R4 JSON Schema) and validate_bundle: issues, expressions, rules, references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import (
    MAX_ISSUES,
    BundleIndex,
    PatientEntry,
    SchemaValidator,
    resources_of_patient,
    validate_bundle,
)
from tests.badinput.generate import BSN, bundle, encounter, observation, patient, url

CORPUS = Path("/work/shared/corpus")
SCHEMA = Path("/work/shared/fhir-r4/fhir.schema.json")
SECRETS = ["999911120", "MRN-7734421", "Vermeulen-Oosterhuis", "Geertruida", "1961-07-23"]


@pytest.fixture(scope="module")
def validator() -> SchemaValidator:
    return SchemaValidator.from_file(SCHEMA)


def issues_of(validator: SchemaValidator, resource: dict, prefix: str | None = None) -> list[tuple]:
    found = validator.validate_resource(resource, prefix)
    text = json.dumps([i.as_fhir() for i in found])
    assert not any(secret in text for secret in SECRETS)
    return [(i.code, i.expression[0] if i.expression else None) for i in found]


def rejected(validator: SchemaValidator, body: dict, **kw) -> FhirError:
    with pytest.raises(FhirError) as info:
        validate_bundle(body, validator, **kw)
    text = json.dumps(info.value.outcome())
    assert not any(secret in text for secret in SECRETS)
    return info.value


def has(err: FhirError, code: str, expression: str | None = None) -> bool:
    return any(i.code == code and (expression is None or expression in i.expression) for i in err.issues)


# --- schema ----------------------------------------------------------------------------------------


def test_corpus_resources_are_valid(validator: SchemaValidator) -> None:
    for path in [*CORPUS.glob("hl7-r4-examples/*.json"), *CORPUS.glob("dutch/*/*.json")]:
        assert validator.validate_resource(json.loads(path.read_bytes())) == [], path.name


def test_ndjson_corpus_is_valid(validator: SchemaValidator) -> None:
    for path in CORPUS.glob("ndjson/*/*.ndjson"):
        if path.name == "log.ndjson":
            continue
        for line in path.read_bytes().splitlines():
            found = issues_of(validator, parse_json(line, max_bytes=1 << 20))
            if path.name == "MedicationRequest.ndjson":
                # cumulus-etl's fixture has `groupIdentifier: [...]` (0..1 in R4): the official schema misses
                # that (no `type: object` on complex types), the tightened one does not.
                assert found in ([], [("structure", "MedicationRequest.groupIdentifier")])
            else:
                assert found == [], path.name


def test_expressions_and_codes(validator: SchemaValidator) -> None:
    resource = patient(birthDate="${DATE, T, D, -60}", gender="M", active="yes", birthdate="x")
    resource["name"][0]["family"] = ""
    found = issues_of(validator, resource, "Bundle.entry[3].resource")
    assert ("value", "Bundle.entry[3].resource.birthDate") in found
    assert ("code-invalid", "Bundle.entry[3].resource.gender") in found
    assert ("structure", "Bundle.entry[3].resource.active") in found
    assert ("structure", "Bundle.entry[3].resource.birthdate") in found
    assert ("value", "Bundle.entry[3].resource.name[0].family") in found


def test_default_prefix_is_the_resource_type(validator: SchemaValidator) -> None:
    without_code = {k: v for k, v in observation().items() if k != "code"}
    assert issues_of(validator, without_code) == [("required", "Observation.code")]


def test_diagnostics_never_quote_the_value(validator: SchemaValidator) -> None:
    resource = patient(birthDate="Vermeulen-Oosterhuis", gender="999911120")
    resource["identifier"] = "MRN-7734421"
    assert len(issues_of(validator, resource)) == 3  # and issues_of checked that no secret appears


def test_unknown_property_names_only_when_element_like(validator: SchemaValidator) -> None:
    found = validator.validate_resource({**patient(), "Geertruida999911120": 1, "valueQuantity": 2})
    rendered = json.dumps([i.as_fhir() for i in found])
    assert "Geertruida999911120" not in rendered
    assert "Patient.valueQuantity" in rendered  # FHIR's own name, in the wrong place


def test_unknown_resource_type(validator: SchemaValidator) -> None:
    assert issues_of(validator, {"resourceType": "Patiënt"}, "Bundle.entry[0].resource") == [
        ("not-supported", "Bundle.entry[0].resource")
    ]


def test_nested_resources_validated_by_their_own_type(validator: SchemaValidator) -> None:
    resource = observation(contained=[{"resourceType": "Practitioner", "gender": "x"}])
    assert issues_of(validator, resource) == [("code-invalid", "Observation.contained[0].gender")]
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "a",
                "part": [{"name": "b", "resource": {"resourceType": "Patient", "birthDate": "1-1-1"}}],
            }
        ],
    }
    assert issues_of(validator, params) == [("value", "Parameters.parameter[0].part[0].resource.birthDate")]


def test_complex_types_must_be_objects_and_integers_32_bit(validator: SchemaValidator) -> None:
    assert issues_of(validator, encounter(**{"class": "IMP"})) == [("structure", "Encounter.class")]
    assert issues_of(validator, patient(multipleBirthInteger=2**31)) == [
        ("value", "Patient.multipleBirthInteger")
    ]
    assert issues_of(validator, patient(multipleBirthInteger=2.5)) == [
        ("structure", "Patient.multipleBirthInteger")
    ]
    assert issues_of(validator, patient(multipleBirthInteger=2**31 - 1)) == []


def test_issue_count_is_capped(validator: SchemaValidator) -> None:
    many = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": patient(gender="x")} for _ in range(500)],
    }
    assert len(validator.validate_resource(many)) == MAX_ISSUES


def test_validators_compiled_once_and_lazily(validator: SchemaValidator) -> None:
    fresh = SchemaValidator.from_file(SCHEMA)
    assert fresh._compiled == {}
    fresh.validate_resource(patient())
    first = fresh._compiled["Patient"]
    fresh.validate_resource(patient())
    assert fresh._compiled["Patient"] is first and list(fresh._compiled) == ["Patient"]


def test_nested_resources_are_not_a_one_of_over_every_type() -> None:
    """Guard against a regression to the official `ResourceList` (a oneOf over 146 types: seconds per
    bundle, and errors from 146 failed branches): a Bundle compiles only the types it holds."""
    fresh = SchemaValidator.from_file(SCHEMA)
    assert "oneOf" not in fresh._definitions["ResourceList"]
    validate_bundle(bundle(patient(), observation(), observation()), fresh)
    assert set(fresh._compiled) == {"Bundle", "Patient", "Observation"}


def test_a_choice_element_in_two_types_is_refused(validator: SchemaValidator) -> None:
    """`value[x]` is one element: `valueString` and `valueBoolean` together are not R4 (the official schema
    admits them). Elements that only share a prefix (`reasonCode`, `reasonReference`) are not a choice."""
    two = {"resourceType": "Observation", "status": "final", "code": {"text": "a"}}
    two |= {"valueString": "Geertruida", "valueBoolean": True}
    assert issues_of(validator, two) == [("structure", "Observation.value[x]")]
    nested = {"resourceType": "Observation", "status": "final", "code": {"text": "a"}}
    nested["extension"] = [{"url": "http://example.org/x", "valueString": "a", "valueCode": "b"}]
    assert issues_of(validator, nested) == [("structure", "Observation.extension[0].value[x]")]
    reasons = encounter()
    reasons |= {"reasonCode": [{"text": "a"}], "reasonReference": [{"reference": "Condition/c"}]}
    assert validator.validate_resource(reasons) == []
    with_extension = {"resourceType": "Observation", "status": "final", "code": {"text": "a"}}
    with_extension |= {"valueBoolean": True, "_valueBoolean": {"id": "b"}}
    assert validator.validate_resource(with_extension) == []


def test_a_malformed_choice_element_is_named_by_its_own_type(validator: SchemaValidator) -> None:
    """A probe: an impossible effectiveDateTime was "not a valid FHIR Observation"."""
    for element, value, kind in (
        ("effectiveDateTime", "1980-03-15T25:00:00", "dateTime"),
        ("valueDateTime", "gisteren", "dateTime"),
        ("effectiveInstant", "2020-01-01", "instant"),
    ):
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, element: value}
        (issue,) = validator.validate_resource(obs)
        assert issue.diagnostics.startswith(f"not a valid FHIR {kind} "), issue
        assert issue.expression == (f"Observation.{element}",) and value not in issue.diagnostics


def test_a_required_choice_element_is_required(validator: SchemaValidator) -> None:
    """The official schema cannot require `medication[x]`; our tightened definitions do, in any variant,
    also as a primitive's extensions only (`_valueBoolean`), and nested in backbones."""
    subject = {"reference": "Patient/p1"}
    statement = {"resourceType": "MedicationStatement", "status": "active", "subject": subject}
    assert issues_of(validator, statement) == [("required", "MedicationStatement.medication[x]")]
    referenced = statement | {"medicationReference": {"reference": "Medication/m"}}
    assert validator.validate_resource(referenced) == []
    assert validator.validate_resource(statement | {"medicationCodeableConcept": {"text": "x"}}) == []
    both = referenced | {"medicationCodeableConcept": {"text": "x"}}
    assert issues_of(validator, both) == [("structure", "MedicationStatement.medication[x]")]
    found = validator.validate_resource({"resourceType": "MedicationAdministration", "status": "completed"})
    assert {i.diagnostics for i in found} >= {
        "missing required element 'medication[x]'",
        "missing required element 'effective[x]'",
    }
    task = {"resourceType": "Task", "status": "ready", "intent": "order", "input": [{"type": {"text": "t"}}]}
    assert issues_of(validator, task, "Bundle.entry[3].resource") == [
        ("required", "Bundle.entry[3].resource.input[0].value[x]")
    ]
    absent = {
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}
        ]
    }
    task["input"][0]["_valueBoolean"] = absent
    assert validator.validate_resource(task) == []


# --- bundle rules ----------------------------------------------------------------------------------


def test_corpus_transaction_bundles(validator: SchemaValidator) -> None:
    for path in sorted(CORPUS.glob("synthea/*/*.json")):
        index = validate_bundle(parse_json(path.read_bytes(), max_bytes=10 << 20), validator)
        assert len(index.patients) == 1
        mine = resources_of_patient(index, index.patients[0])
        assert index.patients[0].index in mine and len(mine) > len(index.references) * 0.9


@pytest.mark.parametrize("btype", ["transaction", "batch", "collection"])
def test_allowed_types(validator: SchemaValidator, btype: str) -> None:
    index = validate_bundle(bundle(patient(), observation(), type=btype), validator)
    assert index.bundle_type == btype
    assert [(p.index, p.full_url) for p in index.patients] == [(0, url(1))]
    assert index.by_full_url == {url(1): 0, url(2): 1}
    assert index.references == [set(), {0}]


@pytest.mark.parametrize("btype", ["searchset", "document", "message", "history", "batch-response"])
def test_other_types_422(validator: SchemaValidator, btype: str) -> None:
    err = rejected(validator, bundle(patient(), type=btype))
    assert err.status == 422 and has(err, "not-supported", "Bundle.type")


def test_schema_errors_are_400_before_rules(validator: SchemaValidator) -> None:
    err = rejected(validator, bundle(patient(birthDate="23-07-1961"), type="searchset"))
    assert err.status == 400 and has(err, "value", "Bundle.entry[0].resource.birthDate")


def test_not_a_bundle(validator: SchemaValidator) -> None:
    assert rejected(validator, patient()).status == 422
    assert rejected(validator, {"resourceType": "Bundel"}).status == 400


def test_patient_required_flag(validator: SchemaValidator) -> None:
    no_patient = bundle({"resourceType": "Practitioner"})
    assert has(rejected(validator, no_patient), "business-rule", "Bundle.entry")
    assert validate_bundle(no_patient, validator, require_patient=False).patients == []


def test_duplicate_full_urls(validator: SchemaValidator) -> None:
    err = rejected(validator, bundle(patient(), observation(), observation(), urls=[url(1), url(2), url(2)]))
    assert err.status == 422 and has(err, "duplicate", "Bundle.entry[2].fullUrl")


def test_all_rule_violations_reported_together(validator: SchemaValidator) -> None:
    body = bundle(
        patient(), observation(subject="Patient/elsewhere"), observation(), urls=[url(1), url(2), url(2)]
    )
    err = rejected(validator, body)
    assert has(err, "duplicate") and has(err, "not-found", "Bundle.entry[1].resource.subject.reference")


@pytest.mark.parametrize(
    "subject",
    [
        "Patient/elsewhere",
        "Patient/elsewhere/_history/1",
        url(42),
        "https://other.example.org/fhir/Patient/1",
        f"Patient?identifier={BSN}|123456782",
        "Patient?family=Jansen",
    ],
)
def test_dangling_patient_references(validator: SchemaValidator, subject: str) -> None:
    err = rejected(validator, bundle(patient(), observation(subject=subject)))
    assert err.status == 422 and has(err, "not-found", "Bundle.entry[1].resource.subject.reference")


@pytest.mark.parametrize(
    ("subject", "text"),
    [
        ({"reference": "patient/pat-1"}, "unrecognised format"),
        ({"reference": "Patient/ pat-1"}, "unrecognised format"),
        ({"reference": "Patient/pat-1?x=1"}, "unrecognised format"),
        ({"reference": "Patient/pat-1#x"}, "unrecognised format"),
        ({"reference": "Patient/" + "x" * 100}, "unrecognised format"),
        ({"reference": "PATIENT/pat-1"}, "unknown type"),  # the shape, but no resource type (a review)
        ({"reference": "Foo/pat-1"}, "unknown type"),
        ({"reference": "#p1"}, "contained resource that is not there"),
        ({"display": "P. Jansen"}, "without a reference"),
        ({"identifier": {"system": "http://ehr.example.nl/mrn", "value": "elsewhere"}}, "not in the Bundle"),
    ],
    ids=["lowercase", "space", "query", "fragment", "long", "upper", "foo", "contained", "display", "id"],
)
def test_a_subject_that_cannot_be_followed_is_refused(
    validator: SchemaValidator, subject: dict, text: str
) -> None:
    """A fresh-eyes probe: an objecting patient's Observation with `subject.reference` "patient/objector-1"
    (or with a space, a query, a fragment, display only) was not linked to the patient, so opt-out could
    not drop it; it was delivered with its subject removed. Whose data a resource is must be followable."""
    obs = observation()
    obs["subject"] = subject
    err = rejected(validator, bundle(patient(), obs))
    assert err.status == 422 and has(err, "not-found", "Bundle.entry[1].resource.subject")
    assert text in json.dumps(err.outcome())
    # other elements keep the old rule: a reference to elsewhere is a warning, the reference is not delivered
    fine = observation(performer=[{"reference": "practitioner/p1"}])
    assert validate_bundle(bundle(patient(), fine), validator).references == [set(), {0}]


def test_dangling_logical_reference(validator: SchemaValidator) -> None:
    obs = observation()
    obs["subject"] = {"identifier": {"system": BSN, "value": "123456782"}}
    err = rejected(validator, bundle(patient(), obs))
    assert has(err, "not-found", "Bundle.entry[1].resource.subject")


def test_resolved_reference_forms(validator: SchemaValidator) -> None:
    logical = observation()
    logical["subject"] = {"identifier": {"system": BSN, "value": "999911120"}}
    body = bundle(
        patient(),
        observation(subject=f"Patient?identifier={BSN}|999911120"),
        observation(subject="Patient?identifier=MRN-7734421"),
        observation(subject="Patient/pat-1"),
        logical,
        type="collection",
    )
    index = validate_bundle(body, validator)
    assert index.references[1:] == [{0}, {0}, {0}, {0}]


def test_relative_reference_resolves_against_the_entry_base(validator: SchemaValidator) -> None:
    urls = ["https://ehr.example.nl/fhir/Patient/pat-1", "https://ehr.example.nl/fhir/Observation/o1"]
    body = bundle(patient(), observation(subject="Patient/pat-1/_history/4"), type="collection", urls=urls)
    assert validate_bundle(body, validator).references == [set(), {0}]
    other_base = [urls[0], "https://lab.example.nl/fhir/Observation/o1"]
    body = bundle(patient(), observation(subject="Patient/pat-1"), type="collection", urls=other_base)
    assert has(rejected(validator, body), "not-found")


def test_external_references_are_warnings(validator: SchemaValidator) -> None:
    body = bundle(
        patient(managingOrganization={"reference": "Organization/ziekenhuis"}),
        observation(performer=[{"reference": "https://other.example.org/fhir/Practitioner/9"}]),
    )
    index = validate_bundle(body, validator)
    assert [(i, ref) for i, ref in index.external_references] == [
        (0, "Organization/ziekenhuis"),
        (1, "https://other.example.org/fhir/Practitioner/9"),
    ]
    assert {(w.severity, w.code) for w in index.issues} == {("warning", "business-rule")}
    assert {w.expression for w in index.issues} == {
        ("Bundle.entry[0].resource.managingOrganization.reference",),
        ("Bundle.entry[1].resource.performer[0].reference",),
    }


def test_contained_and_nested_patients_rejected(validator: SchemaValidator) -> None:
    contained = {**observation(subject="#p"), "contained": [{**patient(), "id": "p"}]}
    assert has(
        rejected(validator, bundle(patient(), contained)),
        "business-rule",
        "Bundle.entry[1].resource.contained[0]",
    )
    nested = bundle(patient(), bundle(patient(id="p2"), type="collection"), type="collection")
    assert has(rejected(validator, nested), "business-rule", "Bundle.entry[1].resource")


def test_entry_without_resource(validator: SchemaValidator) -> None:
    body = bundle(patient())
    body["entry"].append({"request": {"method": "DELETE", "url": "Patient/x"}})
    assert has(rejected(validator, body), "required", "Bundle.entry[1]")


def test_escaped_reference_strings(validator: SchemaValidator) -> None:
    body = bundle(patient(), observation(), urls=['urn:uuid:a"b', "urn:uuid:c"])
    body["entry"][1]["resource"]["subject"]["reference"] = 'urn:uuid:a"b'
    assert validate_bundle(body, validator, require_patient=True).references[1] == {0}


# --- reference graph -------------------------------------------------------------------------------


def graph_bundle() -> dict:
    """0 Patient A, 1 Encounter(A), 2 Observation(encounter=1 only), 3 Patient B, 4 Observation(B, performer
    Practitioner 5), 5 Practitioner, 6 Condition(A) <-> 7 Encounter(diagnosis 6, subject A), 8 List(4, 2)."""
    obs_via_encounter = observation(subject=None)
    del obs_via_encounter["subject"]
    obs_via_encounter["encounter"] = {"reference": url(2)}
    return bundle(
        patient(),
        encounter(),
        obs_via_encounter,
        patient(id="pat-2"),
        observation(subject=url(4), performer=[{"reference": url(6)}]),
        {"resourceType": "Practitioner"},
        {"resourceType": "Condition", "subject": {"reference": url(1)}, "encounter": {"reference": url(8)}},
        encounter(diagnosis=[{"condition": {"reference": url(7)}}]),
        {
            "resourceType": "List",
            "status": "current",
            "mode": "working",
            "entry": [{"item": {"reference": url(5)}}, {"item": {"reference": url(3)}}],
        },
    )


def test_resources_of_patient_transitive_and_cyclic(validator: SchemaValidator) -> None:
    index = validate_bundle(graph_bundle(), validator)
    a, b = index.patients
    assert resources_of_patient(index, a) == {0, 1, 2, 6, 7, 8}
    assert resources_of_patient(index, b) == {3, 4, 8}
    assert resources_of_patient(index, 3) == resources_of_patient(index, b)
    assert 5 not in resources_of_patient(index, a) | resources_of_patient(index, b)  # shared, kept


def test_patient_link_makes_one_person(validator: SchemaValidator) -> None:
    body = bundle(
        patient(link=[{"other": {"reference": url(2)}, "type": "seealso"}]), patient(id="p2"), observation()
    )
    index = validate_bundle(body, validator)
    assert resources_of_patient(index, 1) == {0, 1, 2}


def test_index_is_plain_data() -> None:
    index = BundleIndex("collection", [PatientEntry(0, "u", {})], {"u": 0}, [set(), {0}, {1}])
    assert resources_of_patient(index, 0) == {0, 1, 2}
    assert index.referenced_by == [{1}, {2}, set()]


def test_repeated_external_references_recorded_but_warned_once(validator: SchemaValidator) -> None:
    org = "Organization?identifier=http://fhir.nl/fhir/NamingSystem/ura|00001234"
    body = bundle(
        patient(managingOrganization={"reference": org}),
        *[observation(performer=[{"reference": org}]) for _ in range(3)],
    )
    index = validate_bundle(body, validator)
    assert index.external_references == [(0, org), (1, org), (2, org), (3, org)]
    assert [w.expression for w in index.issues] == [
        ("Bundle.entry[0].resource.managingOrganization.reference",)
    ]


def test_synthea_conditional_references_resolve_once(validator: SchemaValidator) -> None:
    path = next(CORPUS.glob("synthea/fhir-data-pipes-synthea-hiv/Bob965*.json"))
    index = validate_bundle(parse_json(path.read_bytes(), max_bytes=10 << 20), validator)
    assert len(index.external_references) > 200
    assert len(index.issues) == len({ref for _, ref in index.external_references})


def test_many_dangling_references_are_capped(validator: SchemaValidator) -> None:
    body = bundle(patient(), *[observation(subject="Patient/elsewhere") for _ in range(5000)])
    err = rejected(validator, body)
    assert len(err.issues) == MAX_ISSUES


def test_one_dangling_reference_in_two_places_is_two_issues_with_two_paths(
    validator: SchemaValidator,
) -> None:
    obs = observation(subject="Patient/elsewhere")
    obs["performer"] = [{"reference": "Patient/elsewhere"}]
    err = rejected(validator, bundle(patient(), obs))
    paths = sorted(i.expression[0] for i in err.issues if i.code == "not-found")
    assert paths == [
        "Bundle.entry[1].resource.performer[0].reference",
        "Bundle.entry[1].resource.subject.reference",
    ]


def test_two_versions_of_one_resource_are_refused_saying_so(validator: SchemaValidator) -> None:
    first, second = observation(), observation()
    first["meta"], second["meta"] = {"versionId": "1"}, {"versionId": "2"}
    err = rejected(validator, bundle(patient(), first, second, urls=[url(1), url(2), url(2)]))
    (issue,) = [i for i in err.issues if i.code == "duplicate"]
    assert "another version" in issue.diagnostics and issue.expression == ("Bundle.entry[2].fullUrl",)


def test_a_property_name_that_may_be_data_is_not_echoed(validator: SchemaValidator) -> None:
    """A privacy probe put a surname and a BSN in property names; the errors repeated them."""
    found = validator.validate_resource(
        {**patient(), "zyxwortel": 1, "bsn999911120": 2, "vanZwartkruis": 3, "deJong": 4, "birthdate": 5}
    )
    rendered = json.dumps([i.as_fhir() for i in found])
    assert "zyxwortel" not in rendered and "999911120" not in rendered
    # camelCase was named as a likely typo: a surname with its prefix is camelCase too (a third probe)
    assert "Zwartkruis" not in rendered and "Jong" not in rendered
    assert "Patient.birthdate" in rendered  # a typo of FHIR's own name is still named
    with pytest.raises(FhirError) as err:
        parse_json(b'{"resourceType":"Patient","zyxwortel":1,"zyxwortel":2}', max_bytes=1000)
    assert "zyxwortel" not in json.dumps(err.value.outcome())


def test_a_patient_linked_to_a_record_outside_the_bundle_is_refused_saying_why(
    validator: SchemaValidator,
) -> None:
    linked = patient()
    linked["link"] = [{"other": {"reference": "Patient/merged-1"}, "type": "seealso"}]
    err = rejected(validator, bundle(linked, observation()))
    (issue,) = [i for i in err.issues if i.code == "not-found"]
    assert issue.expression == ("Bundle.entry[0].resource.link[0].other.reference",)
    assert "Patient.link" in issue.diagnostics


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Patient", "birthDate": "1961-02-29"}, "Patient.birthDate"),
        (observation(effectiveDateTime="2026-04-31T10:00:00+02:00"), "Observation.effectiveDateTime"),
        (observation(issued="2026-02-30T10:00:00Z"), "Observation.issued"),
        (observation(effectivePeriod={"start": "2026-06-31"}), "Observation.effectivePeriod.start"),
    ],
)
def test_dates_must_be_calendar_dates(validator: SchemaValidator, resource: dict, expression: str) -> None:
    """"Dates SHALL be valid dates": the official pattern admits 30 February; leap days pass."""
    resource.pop("effectiveDateTime", None) if "effectivePeriod" in resource else None
    assert issues_of(validator, resource) == [("value", expression)]
    assert validator.validate_resource({"resourceType": "Patient", "birthDate": "1960-02-29"}) == []


def test_a_required_primitive_is_required_as_a_value_or_its_extensions(validator: SchemaValidator) -> None:
    """Observation.status (1..1) is not in the official schema's `required`; `_status` alone is FHIR."""
    statusless = observation()
    del statusless["status"]
    assert issues_of(validator, statusless) == [("required", "Observation.status")]
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    assert validator.validate_resource(statusless | {"_status": {"extension": [absent]}}) == []


@pytest.mark.parametrize("where", ["entry", "request", "response", "search"])
def test_a_modifier_extension_on_an_entry_is_refused(validator: SchemaValidator, where: str) -> None:
    """A re-probe: a modifier on Bundle.entry or entry.request was ignored and its resource delivered (a
    third probe: on entry.search or entry.response too)."""
    from gateway.pipeline.validate import validate_bundle

    entry = {"fullUrl": "urn:uuid:p", "resource": patient(), "request": {"method": "PUT", "url": "Patient/p"}}
    modifier = [{"url": "http://ehr.example.org/fhir/entry-is-a-test", "valueBoolean": True}]
    parts = {"response": {"status": "200"}, "search": {"mode": "match"}}
    if where in parts:
        entry[where] = parts[where]
    (entry if where == "entry" else entry[where])["modifierExtension"] = modifier
    with pytest.raises(FhirError) as err:
        validate_bundle({"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, validator)
    assert err.value.status == 422
    suffix = ".modifierExtension" if where == "entry" else f".{where}.modifierExtension"
    assert err.value.outcome()["issue"][0]["expression"] == [f"Bundle.entry[0]{suffix}"]


@pytest.mark.parametrize("method", ["DELETE", "GET", "PATCH", "_method only"])
def test_an_entry_that_is_no_post_or_put_is_refused_even_with_a_resource(
    validator: SchemaValidator, method: str
) -> None:
    """A third probe: a DELETE entry carrying a resource was delivered as a PUT, a deletion in the EHR an
    upsert at the registry. A fourth: a method given only as `_method` extensions went through too."""
    from gateway.pipeline.validate import validate_bundle

    request: dict[str, object] = {"method": method, "url": "Patient/p"}
    if method == "_method only":
        said = {"extension": [{"url": "http://x.org/m", "valueCode": "PUT"}]}
        request = {"url": "Patient/p", "_method": said}
    entry = {"fullUrl": "urn:uuid:p", "resource": patient(), "request": request}
    with pytest.raises(FhirError) as err:
        validate_bundle({"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, validator)
    assert err.value.status == 422
    assert err.value.outcome()["issue"][0]["expression"] == ["Bundle.entry[0].request.method"]


def test_a_contained_resource_that_contains_resources_is_refused(validator: SchemaValidator) -> None:
    """A re-probe: a relative contained in a contained Location was never sought by the leak gate, and their
    street reached the registry. R4 forbids it (dom-2), the schema does not say so."""
    relative = {"resourceType": "RelatedPerson", "id": "rp", "patient": {"reference": "Patient/p"}}
    place = {"resourceType": "Location", "id": "l", "contained": [relative]}
    visit = {**encounter(), "contained": [place]}
    issues = validator.validate_resource(visit, "Bundle.entry[1].resource")
    assert [(i.code, i.expression) for i in issues] == [
        ("invariant", ("Bundle.entry[1].resource.contained[0].contained",))
    ]
    assert validator.validate_resource({**encounter(), "contained": [relative]}) == []
