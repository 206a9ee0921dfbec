"""The command line as testers and integration engineers use it: deidentify, scan, selftest, objections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app
from tests.identity import leaked_kinds

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "corpus"
runner = CliRunner()


def _corpus_bundles_and_patients() -> list[Path]:
    files = []
    for path in sorted(CORPUS.rglob("*.json")):
        kind = json.loads(path.read_text()).get("resourceType")
        if kind in ("Bundle", "Patient"):
            files.append(path)
    return files


@pytest.mark.parametrize("path", _corpus_bundles_and_patients(), ids=lambda p: p.name)
def test_every_corpus_bundle_and_patient_deidentifies_or_is_cleanly_rejected(path, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["deidentify", str(path), "--registry", "example-generic", "--out", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    written = list(out.glob("*.json")) if out.exists() else []
    if result.exit_code == 2:
        outcome = json.loads(result.output[: result.output.rindex("}") + 1])
        assert outcome["resourceType"] == "OperationOutcome"
        assert not written
        return
    assert result.exit_code == 0, result.output
    if not written:  # every patient dropped (no pseudonym possible, or opted out): nothing leaves
        assert "nothing to deliver" in result.output
        return
    scanned = runner.invoke(app, ["scan", *map(str, written)])
    assert scanned.exit_code == 0, scanned.output
    text = written[0].read_text()
    assert leaked_kinds(json.loads(path.read_text()), text) == []


def test_template_placeholders_exit_2_with_operation_outcome(tmp_path):
    bundle = json.loads(
        (Path(__file__).parent.parent / "examples" / "02-nlps1-vector-patients-transaction.json").read_text()
    )
    bundle["entry"][1]["resource"]["period"]["start"] = "${DATE, T, D, -60}"
    path = tmp_path / "placeholder.json"
    path.write_text(json.dumps(bundle))
    result = runner.invoke(app, ["deidentify", str(path), "--registry", "example-generic"])
    assert result.exit_code == 2
    outcome = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert outcome["resourceType"] == "OperationOutcome"
    assert any("period" in e for i in outcome["issue"] for e in i.get("expression", []))
    assert "${DATE" not in result.stdout


def test_strict_checks_the_input_with_the_r4b_models_and_names_the_path(tmp_path):
    """An Immunization whose occurrence is only a data-absent-reason extension: valid R4, which the R4B
    models refuse; `--strict` refuses it naming the entry, without it the file is delivered."""
    from tests.test_strict import immunization_without_date

    example = Path(__file__).parent.parent / "examples" / "01-nictiz-nl-core-transaction.json"
    bundle = json.loads(example.read_text())
    patient_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    entry = {"fullUrl": "urn:uuid:5d9e3f0c-1b2a-4c8d-9e7f-0a1b2c3d4e5f"}
    entry["resource"] = immunization_without_date(patient_url)
    entry["request"] = {"method": "POST", "url": "Immunization"}
    bundle["entry"].append(entry)
    path = tmp_path / "immunization.json"
    path.write_text(json.dumps(bundle))
    args = ["deidentify", str(path), "--registry", "example-generic", "--out", str(tmp_path / "out")]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args[:-2], "--strict"])
    assert result.exit_code == 2
    outcome = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    last = len(bundle["entry"]) - 1
    assert [i["expression"] for i in outcome["issue"]] == [[f"Bundle.entry[{last}].resource"]]


def test_selftest_passes_on_the_shared_vectors_and_fails_on_an_altered_copy(tmp_path):
    vectors = Path(__file__).parent / "vectors" / "pseudonym-vectors.json"
    assert runner.invoke(app, ["selftest", "--vectors", str(vectors)]).exit_code == 0
    data = json.loads(vectors.read_text())
    data["cases"][0]["pseudonyms"][1]["pre_b64u"] = "A" + data["cases"][0]["pseudonyms"][1]["pre_b64u"][1:]
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(data))
    failed = runner.invoke(app, ["selftest", "--vectors", str(altered)])
    assert failed.exit_code == 1
    assert "NGGV" in failed.output


def test_profiles_check_accepts_the_shipped_profiles():
    result = runner.invoke(app, ["profiles", "check"])
    assert result.exit_code == 0, result.output


def test_profiles_check_takes_several_files_and_names_where_the_yaml_breaks(tmp_path):
    """profiles/README promised several paths, the command took one; bad YAML ended in a traceback."""
    bad = tmp_path / "heart.yaml"
    bad.write_text("name: [unclosed\n")
    shipped = Path(__file__).resolve().parent.parent / "profiles" / "example-generic.yaml"
    result = runner.invoke(app, ["profiles", "check", str(bad), str(shipped)])
    assert result.exit_code == 1, result.output
    assert f"{bad}: not valid YAML (line 2, column 1)" in result.output and "Traceback" not in result.output
    assert runner.invoke(app, ["profiles", "check", str(shipped)]).exit_code == 0


def test_objections_import_stores_keyed_hashes_only(tmp_path, monkeypatch):
    from gateway.keys import init_keys, load_keys
    from gateway.optout import objection_digest
    from gateway.store import open_store

    provider = "ura:00000000"
    init_keys(tmp_path / "keys", [provider])
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "providers": [{"id": provider}],
                "registries": {
                    "example-generic": {"profile": "example-generic", "endpoint": "http://127.0.0.1:9"}
                },
            }
        )
    )
    csv_file = tmp_path / "objections.csv"
    csv_file.write_text("patient_number;date\nP0001234;2026-01-01\nH-778899;2026-02-01\n<bad number>;x\n")
    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    monkeypatch.setenv("FHIR_GATEWAY_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("FHIR_GATEWAY_STORE_URL", store_url)
    result = runner.invoke(
        app, ["objections", "import", str(csv_file), "--provider", provider, "--config", str(config)]
    )
    assert result.exit_code == 1  # one refused row
    assert "2 objections read, 2 new, 1 rows refused" in result.output
    assert "<bad number>" not in result.output
    keys = load_keys(tmp_path / "keys", [provider])
    store = open_store(store_url)
    digest = objection_digest(keys.objection_key(), provider, "P0001234")
    assert store.optout_lookup(provider, "example-generic", [digest])
    assert b"P0001234" not in (tmp_path / "gateway.db").read_bytes()
    (event,) = [e for e in store.list_audit() if e.event == "objection-registered"]
    assert (event.actor, event.outcome, event.provider, event.registry) == (
        "cli:objections-import", "imported", provider, "*"
    )
    assert event.counts == {"read": 2, "new": 2, "refused": 1}
    # found by a fresh-eyes operator: any provider id was accepted, and a file without the column (or a
    # header at all) ended in a traceback
    unknown = runner.invoke(
        app, ["objections", "import", str(csv_file), "--provider", "ura:99999999", "--config", str(config)]
    )
    assert unknown.exit_code == 2 and "unknown provider" in unknown.output
    headless = tmp_path / "headless.csv"
    headless.write_text("nummer\nP0001234\n")
    result = runner.invoke(
        app, ["objections", "import", str(headless), "--provider", provider, "--config", str(config)]
    )
    assert result.exit_code == 2 and "header has no patient_number column" in result.output, result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["clients"][0].update(provider="ura:0000000X"), "'ura:0000000X' is not in providers"),
        (lambda c: c["clients"][0]["registries"].append("heart-registy"), "['heart-registy'] are not in"),
        (lambda c: c.update(providrs=c.pop("providers")), "providers: Field required; providrs: Extra"),
        (  # gateway.example.yaml unedited used to pass `check`
            lambda c: c.update(admin_api_key_sha256="<sha256 of the admin API key>"),
            "admin_api_key_sha256: must be the SHA-256 (64 hex digits)",
        ),
    ],
    ids=["client-provider", "client-registry", "misspelled-key", "placeholder-hash"],
)
def test_configuration_mistakes_are_one_line_naming_the_place(tmp_path, change, message):
    """A client of an unknown provider passed `check` and then failed every post with a 500; a misspelled
    registry showed only at the first post (403)."""
    from gateway.config import load_config

    config = {
        "providers": [{"id": "ura:00000000"}],
        "clients": [{"id": "ehr", "provider": "ura:00000000", "registries": ["example-generic"]}],
        "registries": {"example-generic": {"profile": "example-generic", "endpoint": "http://127.0.0.1:9"}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    load_config(path)
    change(config)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="is invalid") as raised:
        load_config(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert "pydantic.dev" not in str(raised.value)
    path.write_text("providers: [unclosed\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(line 2, column 1\)"):
        load_config(path)


def test_deidentify_with_a_configuration_honours_the_objection_register(tmp_path, monkeypatch):
    """With --config the offline path runs the configured chain: keys, TTP and every opt-out source."""
    from gateway.keys import init_keys, load_keys
    from gateway.optout import objection_digest
    from gateway.store import open_store
    from gateway.ttp.keystore import init_keys as init_ttp_keys

    provider, registry = "ura:00000000", "example-generic"
    mrn_system = "http://ehr.example.org/fhir/NamingSystem/patient-number"
    init_keys(tmp_path / "keys", [provider])
    init_ttp_keys(tmp_path / "ttp-keys", [registry])  # the embedded TTP's keys sit beside the gateway's
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "providers": [{"id": provider, "mrn_system": mrn_system}],
                "registries": {registry: {"profile": registry, "endpoint": "http://127.0.0.1:9"}},
                "ttp": {"url": "embedded"},
            }
        )
    )
    store_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    monkeypatch.setenv("FHIR_GATEWAY_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("FHIR_GATEWAY_STORE_URL", store_url)
    keys = load_keys(tmp_path / "keys", [provider])
    open_store(store_url).optout_add(
        provider, "*", objection_digest(keys.objection_key(), provider, "P0001234")
    )

    example = Path(__file__).parent.parent / "examples" / "02-nlps1-vector-patients-transaction.json"
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["deidentify", str(example), "--registry", registry, "--out", str(out), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    delivered = json.loads(next(out.glob("*.json")).read_text())
    patients = [e for e in delivered["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert len(patients) == 3  # four vector persons, the one with patient number P0001234 objected
    assert "P0001234" not in json.dumps(delivered)
    assert "only Consents in the files" not in result.output
    bare = runner.invoke(
        app, ["deidentify", str(example), "--registry", registry, "--out", str(tmp_path / "o2")]
    )
    assert bare.exit_code == 0 and "only Consents in the files" in " ".join(bare.output.split())


def test_an_output_file_is_never_named_after_its_input(tmp_path):
    """Synthea and EHR exports name their files after the patient: `Buster_Hoeger_….json` became
    `Buster_Hoeger_….deid.json` beside the pseudonymised data (a privacy probe)."""
    example = Path(__file__).parent.parent / "examples" / "02-nlps1-vector-patients-transaction.json"
    named = tmp_path / "Johanna_van_Putten_111222333.json"
    named.write_bytes(example.read_bytes())
    out = tmp_path / "out"
    args = ["deidentify", str(named), "--registry", "example-generic", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    (written,) = out.iterdir()
    assert "Putten" not in written.name and "111222333" not in written.name
    assert written.name == json.loads(written.read_text())["id"] + ".deid.json"
    assert written.name in result.output  # the summary says which output is whose


def test_relative_paths_are_in_the_configurations_folder_whatever_the_current_one(tmp_path, monkeypatch):
    """A probe: `objections import --config /elsewhere/gateway.yaml` run from another folder wrote into a
    new, empty store there (the gateway read the old one and delivered the objector), and `check` found no
    profiles. The store, the keys and the YAML's own paths are now in the configuration's folder."""
    from gateway.config import Settings, load_config
    from gateway.keys import init_keys

    home, elsewhere = tmp_path / "gateway", tmp_path / "elsewhere"
    elsewhere.mkdir()
    provider = "ura:00000000"
    init_keys(home / "var" / "keys", [provider])
    (home / "profiles").mkdir()
    shipped = Path(__file__).resolve().parent.parent / "profiles" / "example-generic.yaml"
    (home / "profiles" / "heart.yaml").write_text(shipped.read_text().replace("example-generic", "heart"))
    config = home / "gateway.yaml"
    registries = {"heart": {"profile": "heart", "endpoint": "http://127.0.0.1:9"}}
    raw = {"providers": [{"id": provider}], "registries": registries, "profiles_dir": "profiles"}
    config.write_text(yaml.safe_dump(raw))
    (elsewhere / "objections.csv").write_text("patient_number\nP0001234\nAb12Cd\n")
    monkeypatch.chdir(elsewhere)
    for name in ("FHIR_GATEWAY_KEY_DIR", "FHIR_GATEWAY_STORE_URL", "FHIR_GATEWAY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(
        app, ["objections", "import", "objections.csv", "--provider", provider, "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert (home / "var" / "gateway.db").is_file() and not (elsewhere / "var").exists()
    assert str(home / "var" / "gateway.db") in result.output.replace("\n", "")  # the store it wrote to
    assert load_config(config).profiles_dir == str(home / "profiles")
    # a re-probe: a number registered in mixed case held for that spelling only; now for any case
    import asyncio

    from gateway.keys import load_keys
    from gateway.optout import RegisterOptOut
    from gateway.optout.base import PatientRef
    from gateway.store import open_store

    store = open_store(f"sqlite:///{home / 'var' / 'gateway.db'}")
    key = load_keys(home / "var" / "keys", [provider]).objection_key()
    source = RegisterOptOut(store.objection_lookup, key)
    numbers = ("ab12cd", "AB12CD", "p0001234")
    refs = [PatientRef(f"p{n}", {}, mrn, provider, "heart") for n, mrn in enumerate(numbers)]
    decisions = asyncio.run(source.check(refs))
    assert [d.status for d in decisions.values()] == ["objected"] * 3
    assert Settings(config=config).key_dir == home / "var" / "keys"
    # a re-probe: through a symlink in another folder, the paths were the link's folder's
    (elsewhere / "gateway.yaml").symlink_to(config)
    linked = Settings(config=elsewhere / "gateway.yaml")
    assert linked.key_dir == home / "var" / "keys" and str(home / "var" / "gateway.db") in linked.store_url
    assert load_config(elsewhere / "gateway.yaml").profiles_dir == str(home / "profiles")
    monkeypatch.setenv("FHIR_GATEWAY_KEY_DIR", str(tmp_path / "no-keys"))
    keyless = runner.invoke(
        app, ["objections", "import", "objections.csv", "--provider", provider, "--config", str(config)]
    )
    assert keyless.exit_code == 2 and "Traceback" not in keyless.output and "source key" in keyless.output


def test_the_demo_refuses_a_work_folder_that_is_not_empty(tmp_path):
    """A probe: `demo --work-dir D` run twice ended in a KeyStoreError traceback (it refuses to overwrite
    keys, rightly). Now one line, before anything starts, and the folder is left as it was."""
    (tmp_path / "ttp-keys").mkdir()
    (tmp_path / "ttp-keys" / "master.key").write_bytes(b"k")
    result = runner.invoke(app, ["demo", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
    assert (tmp_path / "ttp-keys" / "master.key").read_bytes() == b"k"


def test_keys_list_of_a_folder_that_is_not_there_says_so(tmp_path):
    """A probe: `keys list` of a missing key folder printed nothing and exit 0, as if all were well."""
    result = runner.invoke(app, ["keys", "list", "--key-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no key folder" in result.output


def test_scan_takes_the_ndjson_files_of_an_export_as_the_original(tmp_path):
    """A probe: `scan --original export/Patient.ndjson` refused the bulk input as "unreadable"."""
    from gateway.bulk.synth import SynthSpec, write_export

    write_export(tmp_path / "export", SynthSpec(patients=2, resources_per_patient=3))
    patient = json.loads((tmp_path / "export" / "Patient.ndjson").read_text().splitlines()[0])
    family = patient["name"][0]["family"]
    leaked = {"resourceType": "Observation", "status": "final", "code": {"text": f"bij {family} thuis"}}
    out = tmp_path / "out.json"
    out.write_text(json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": leaked}]}))
    originals = ["--original", str(tmp_path / "export" / "Patient.ndjson")]
    originals += ["--original", str(tmp_path / "export" / "Observation.ndjson")]
    found = runner.invoke(app, ["scan", str(out), *originals])
    assert found.exit_code == 1 and "Bundle.entry[0].resource.code.text: name" in found.output, found.output
    assert family not in found.output
    (tmp_path / "bad.ndjson").write_text('{"resourceType": "Patient"}\n{"resourceType": \n')
    unread = runner.invoke(app, ["scan", str(out), "--original", str(tmp_path / "bad.ndjson")])
    assert unread.exit_code == 2 and "line 2: unreadable" in unread.output


def test_a_key_given_twice_in_a_profile_the_rules_or_the_configuration_is_refused(tmp_path):
    """A probe: PyYAML keeps the last of two equal keys, so a reviewer read `note: drop` while the second
    `note: keep` applied; `profiles check` said valid. Now each file names the key and its line."""
    shipped = (Path(__file__).resolve().parent.parent / "profiles" / "example-generic.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(shipped + "free_text: {note: keep}\n")
    result = runner.invoke(app, ["profiles", "check", str(twice)])
    assert result.exit_code == 1, result.output
    assert "the key 'free_text' is given twice (line" in result.output
    from gateway.config import load_config

    config = tmp_path / "gateway.yaml"
    config.write_text("providers: []\nregistries: {}\nproviders: []\n")
    with pytest.raises(ValueError, match=r"not valid YAML: the key 'providers' is given twice \(line 3"):
        load_config(config)
    # a merge key is no key given twice, and a key it brings may be given again (a re-probe's configuration)
    from gateway import yamlfile

    merged = yamlfile.load("a: &reg {profile: p, endpoint: x}\nb:\n  <<: *reg\n  endpoint: y\n")
    assert merged["b"] == {"profile": "p", "endpoint": "y"}


def test_profiles_check_takes_another_rules_file(tmp_path):
    """A probe: `fhir-gateway profiles check --rules` was refused: the command's option was not passed on."""
    shipped = Path(__file__).resolve().parent.parent / "mappings" / "deid-rules.yaml"
    rules = tmp_path / "rules.yaml"
    text = shipped.read_text()
    rules.write_text(text.replace("Dosage.text: {method: remove", "Dosage.text: {method: shred", 1))
    result = runner.invoke(app, ["profiles", "check", "--rules", str(rules)])
    assert result.exit_code == 1 and f"{rules}: " in result.output and "Dosage.text" in result.output
    assert runner.invoke(app, ["profiles", "check", "--rules", str(shipped)]).exit_code == 0


def test_a_registry_tries_its_own_profile_offline_with_profiles_dir(tmp_path):
    """A probe: trying a profile being written needed a whole configuration, keys and a TTP."""
    root = Path(__file__).resolve().parent.parent
    profile = (root / "profiles" / "example-generic.yaml").read_text()
    own = tmp_path / "profiles"
    own.mkdir()
    (own / "heart.yaml").write_text(profile.replace("id: example-generic", "id: heart-registry", 1))
    example = root / "examples" / "02-nlps1-vector-patients-transaction.json"
    args = ["deidentify", str(example), "--registry", "heart-registry", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--profiles-dir", str(own)])
    assert result.exit_code == 0, result.output
    (delivered,) = (tmp_path / "out").glob("*.deid.json")
    assert "urn:fhir-delivery-gateway:profile:heart-registry" in delivered.read_text()
    assert runner.invoke(app, args).exit_code == 2  # not a shipped profile
    scan = ["scan", str(delivered), "--original", str(example), "--registry", "heart-registry"]
    checked = runner.invoke(app, [*scan, "--profiles-dir", str(own)])
    assert checked.exit_code == 0 and "clean" in checked.output, checked.output
    assert runner.invoke(app, scan).exit_code == 2  # the shipped folder has no such profile


def test_profiles_check_warns_of_a_type_the_rules_never_let_through(tmp_path):
    """A probe: a profile listing DocumentReference with its content, while the rules drop attachments
    (a required part of content), passed the check; the engine then dropped every DocumentReference."""
    profile = tmp_path / "docs.yaml"
    shipped = (Path(__file__).resolve().parent.parent / "profiles" / "example-generic.yaml").read_text()
    media = "  Media: [status, subject, content]\n"
    profile.write_text(shipped.replace("id: example-generic", "id: docs", 1) + media)
    result = runner.invoke(app, ["profiles", "check", str(profile)])
    assert result.exit_code == 0, result.output
    warning = "resources.Media is never delivered: the rules always remove content, which it requires"
    assert warning in result.output
    plain = runner.invoke(app, ["profiles", "check"])
    assert plain.exit_code == 0 and "warning" not in plain.output
