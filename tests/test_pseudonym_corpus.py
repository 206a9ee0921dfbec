"""Extraction from the real public corpus (/work/shared/corpus): what each Patient yields, derived by reading
the files. These are not nl-core-complete patients, so most of the value is in the skips being right."""

import glob
import json
from pathlib import Path

import pytest

from gateway.pseudonym import nlps1
from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import load_input_mapping

CORPUS = Path("/work/shared/corpus")
pytestmark = pytest.mark.skipif(not CORPUS.exists(), reason="shared corpus not mounted")
MAPPING = load_input_mapping()
NO_ADDRESS = {"C": "no-dutch-postcode", "RGG": "no-dutch-postcode", "A": "no-dutch-postcode-or-house-number"}
NO_BIRTH_DATE = dict.fromkeys(("NGGV", "SNGGV", "NGG", "SNGG", "GG"), "birth-date-not-full")
NO_BSN = {"B": "bsn-missing-or-fails-elfproef"}


def _load(relative: str) -> dict:
    return json.loads((CORPUS / relative).read_text())


def _extract(patient: dict, mrn_system: str | None = None) -> tuple[dict, dict]:
    extraction = extract_inputs(patient, nlps1.TYPES, MAPPING, mrn_system)
    return {i.type: i.fields for i in extraction.inputs}, extraction.skipped


def test_nictiz_zib2024_patient_alt_1():
    # BSN 111222333 (passes the 11-proef); official name NL1 with own-name "Jansen", given "Peter" (BR) first;
    # a second official name with only the initial "P." (IN); gender "other"; birthDate 1934-04-28.
    # The HP address with "1012 NX" / 15 / "B bis" belongs to Patient.contact (the daughter), NOT to the
    # patient: the patient has no address, so C/RGG/A are skipped. No patient-number identifier.
    fields, skipped = _extract(_load("dutch/nictiz-zib2024/nl-core-Patient-alt-1.json"))
    assert fields == {
        "B": ("111222333",),
        "NGGV": ("JANSEN", "19340428", "O", "P"),
        "SNGGV": ("JANS", "19340428", "O", "P"),
        "NGG": ("JANSEN", "19340428", "O"),
        "SNGG": ("JANS", "19340428", "O"),
        "GG": ("19340428", "O"),
    }
    assert skipped == {**NO_ADDRESS, "MRN": "mrn-system-not-configured"}


def test_nictiz_alt_1_never_uses_the_contact_persons_data():
    patient = _load("dutch/nictiz-zib2024/nl-core-Patient-alt-1.json")
    extraction = extract_inputs(patient, nlps1.TYPES, MAPPING, "http://example.org/mrn")
    text = " ".join(i.canonical for i in extraction.inputs)
    for contact_value in ("PUTTEN", "1012NX", "J|", "BBIS"):
        assert contact_value not in text
    assert extraction.skipped["MRN"] == "mrn-missing"


def test_hl7_patient_example():
    # Official name "Chalmers" (no nl-core extensions, no assembly order → the family fallback), given
    # "Peter"; the "maiden" name "Windsor" is not read. male, 1974-12-25. Home address postcode "3999"
    # (Australian) is not Dutch. MRN "12345" under urn:oid:1.2.36.146.595.217.0.1.
    fields, skipped = _extract(
        _load("hl7-r4-examples/Patient-example.json"), "urn:oid:1.2.36.146.595.217.0.1"
    )
    assert fields == {
        "NGGV": ("CHALMERS", "19741225", "M", "P"),
        "SNGGV": ("CHAL", "19741225", "M", "P"),
        "NGG": ("CHALMERS", "19741225", "M"),
        "SNGG": ("CHAL", "19741225", "M"),
        "GG": ("19741225", "M"),
        "MRN": ("12345",),
    }
    assert skipped == {**NO_BSN, **NO_ADDRESS}


@pytest.mark.parametrize(
    ("file", "sex", "mrn"), [("Patient-pat1.json", "M", "654321"), ("Patient-pat2.json", "O", "123456")]
)
def test_hl7_patients_without_birth_date(file, sex, mrn):
    # "Donald" / "Duck", no birthDate, no address; pat2 is gender "other" (with a v2-0001 "A" extension).
    fields, skipped = _extract(_load(f"hl7-r4-examples/{file}"), "urn:oid:0.1.2.3.4.5.6.7")
    assert fields == {"MRN": (mrn,)}
    assert skipped == {**NO_BSN, **NO_BIRTH_DATE, **NO_ADDRESS}
    assert sex  # the sex is valid, but every type that uses it also needs the missing birth date


SYNTHEA = {
    # file: (name8, name4, birth date, sex, initial) read from the Patient resource of each bundle.
    "fhir-data-pipes-synthea-hiv/Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json": (
        "KEELING",
        "KEEL",
        "19910708",
        "M",
        "B",
    ),
    "fhir-data-pipes-synthea-hiv/Cecelia952_Romaguera67_f1731e33-dc55-4ee8-72d7-cece2e49bedd.json": (
        "ROMAGUER",
        "ROMA",
        "20021016",
        "V",
        "C",
    ),
    "smart-generated-sample-data-r4/Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json": (
        "HOEGER",
        "HOEG",
        "19880316",
        "M",
        "B",
    ),
    "smart-generated-sample-data-r4/Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json": (
        "KREIGER",
        "KREI",
        "19840702",
        "M",
        "C",
    ),
    "smart-generated-sample-data-r4/Liz_Conn_27c911c6-f045-4ffa-af5d-6eba57ac94b2.json": (
        "CONN",
        "CONN",
        "19861128",
        "V",
        "L",
    ),  # the "maiden" name Rowe is not read
    "smart-generated-sample-data-r4/Ned_Hintz_e4b9259d-0f54-48d1-a35d-b526729a4dfe.json": (
        "HINTZ",
        "HINT",
        "19931208",
        "M",
        "N",
    ),
    "smart-generated-sample-data-r4/Nelida_Gislason_d9cb9ceb-c966-47f7-b2ea-c435678a658e.json": (
        "GISLASON",
        "GISL",
        "19490809",
        "V",
        "N",
    ),
}


@pytest.mark.parametrize("file", sorted(SYNTHEA), ids=lambda f: f.split("/")[-1].split("_")[0])
def test_synthea_bundle_patients(file):
    # US patients: no BSN, addresses without use/AddressType (and US ZIP codes) → no address is chosen;
    # digits in Synthea names are dropped by the A–Z rule; MRN under http://hospital.smarthealthit.org.
    bundle = _load(f"synthea/{file}")
    patients = [
        e["resource"] for e in bundle["entry"] if e.get("resource", {}).get("resourceType") == "Patient"
    ]
    assert len(patients) == 1
    name8, name4, birth, sex, initial = SYNTHEA[file]
    fields, skipped = _extract(patients[0], "http://hospital.smarthealthit.org")
    mrn = file.rsplit("_", 1)[1].removesuffix(".json")  # Synthea's MRN is the id in the file name
    assert fields == {
        "NGGV": (name8, birth, sex, initial),
        "SNGGV": (name4, birth, sex, initial),
        "NGG": (name8, birth, sex),
        "SNGG": (name4, birth, sex),
        "GG": (birth, sex),
        "MRN": (mrn,),
    }
    assert skipped == {**NO_BSN, **NO_ADDRESS}


def _all_corpus_patients():
    for path in sorted(glob.glob(str(CORPUS / "**" / "*.json"), recursive=True)):
        data = json.loads(Path(path).read_text())
        resources = [e.get("resource") for e in data.get("entry", [])] if "entry" in data else [data]
        yield from (
            (path, r) for r in resources if isinstance(r, dict) and r.get("resourceType") == "Patient"
        )
    for path in sorted(glob.glob(str(CORPUS / "**" / "*.ndjson"), recursive=True)):
        for line in Path(path).read_text().splitlines():
            if line.strip():
                resource = json.loads(line)
                if resource.get("resourceType") == "Patient":
                    yield path, resource


def test_every_corpus_patient_is_accounted_for_per_type():
    seen = 0
    for _path, patient in _all_corpus_patients():
        extraction = extract_inputs(patient, nlps1.TYPES, MAPPING, "http://hospital.smarthealthit.org")
        assert {i.type for i in extraction.inputs} | set(extraction.skipped) == set(nlps1.TYPES)
        # Only the Nictiz patient carries a (valid) BSN; no corpus patient has a Dutch address of its own.
        assert not {"C", "RGG", "A"} & {i.type for i in extraction.inputs}
        seen += 1
    assert seen >= 35  # README: 40 Patient resources in the tree (some inside bundle types we also read)


def test_hl7_father_bundle_name_without_use_is_not_read():
    # The Patient's only name has no `use`; nl-core puts the birth name on the `official` name only, so
    # NGG* are skipped rather than guessing that an unlabelled name is the birth name.
    bundle = _load("hl7-r4-examples/Bundle-father.json")
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    fields, skipped = _extract(patient)
    assert fields == {"GG": ("19550106", "V")}
    assert skipped == {
        **NO_BSN,
        **NO_ADDRESS,
        "MRN": "mrn-system-not-configured",
        **dict.fromkeys(("NGGV", "SNGGV", "NGG", "SNGG"), "birth-name-missing"),
    }
