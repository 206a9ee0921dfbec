"""Bulk delivery (offline chain, real files): corpus exports, opt-out, invalid lines, resume, bounded
memory."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.bulk import (
    BulkOptions,
    DirSink,
    JobMismatch,
    SourceError,
    StopAfter,
    StoreSink,
    run_bulk,
    run_bulk_async,
)
from gateway.bulk import index as ix
from gateway.bulk.chains import offline_chains
from gateway.bulk.sources import resolve_sources
from gateway.bulk.synth import MRN_SYSTEM, SynthSpec, patient_id, write_export
from gateway.forward import RegistryClient
from gateway.metrics import GatewayMetrics
from gateway.pseudonym.extract import extract_inputs
from gateway.receiver import create_receiver_app
from gateway.store import Store, open_store
from gateway.worker import OutboxWorker
from tests.servers import serve
from tests.test_strict import immunization_without_date

CORPUS = Path("/work/shared/corpus/ndjson")
REGISTRY = "example-generic"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="shared NDJSON corpus not present")


def bundles(folder: Path) -> list[dict]:
    return [orjson.loads(p.read_bytes()) for p in sorted(folder.glob("*.json"))]


def resources(folder: Path) -> list[dict]:
    return [e["resource"] for b in bundles(folder) for e in b["entry"]]


@needs_corpus
def test_sample_bulk_export_is_delivered_per_patient(tmp_path: Path) -> None:
    summary = run_bulk(
        [CORPUS / "sample-bulk-10-patients"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=BulkOptions(group_size=4, bundle_size=150),
    )
    assert summary.patients == 13 and summary.groups_total == 4 and summary.groups_done == 4
    assert summary.resources_in["Condition"] == 555
    assert summary.sent["Patient"] == 13 and summary.sent["Condition"] == 555
    assert summary.invalid_lines == []
    for bundle in bundles(tmp_path / "out"):
        assert bundle["type"] == "transaction"
        patients = sum(e["resource"]["resourceType"] == "Patient" for e in bundle["entry"])
        # at most bundle_size entries (+ Provenance), unless one patient alone is bigger: never split one
        assert len(bundle["entry"]) <= 151 or patients == 1
        full_urls = {e["fullUrl"] for e in bundle["entry"]}
        refs = {r for r in _references(bundle) if r.startswith("urn:uuid:")}
        assert refs <= full_urls  # every internal reference resolves inside its own Bundle
        provenance = bundle["entry"][-1]["resource"]
        assert provenance["resourceType"] == "Provenance"
        assert {t["reference"] for t in provenance["target"]} == full_urls - {bundle["entry"][-1]["fullUrl"]}


@needs_corpus
def test_cumulus_export_reports_resources_of_absent_patients(tmp_path: Path) -> None:
    summary = run_bulk(
        [CORPUS / "cumulus-etl-simple-input"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
    )
    assert summary.patients == 2
    absent = summary.dropped["patient-absent"]
    assert absent["Condition"] == 2 and absent["Procedure"] == 2
    assert summary.sent["Patient"] == 2 and summary.sent["Encounter"] == 2
    assert "shared-not-referenced" in summary.dropped  # Organizations etc. no delivered resource points at
    sent_types = {r["resourceType"] for r in resources(tmp_path / "out")}
    assert "Condition" not in sent_types


def test_objecting_patient_is_dropped_with_all_their_resources(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=12, resources_per_patient=8, objecting={5}))
    summary = run_bulk(
        [tmp_path / "export"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=BulkOptions(group_size=5),
    )
    assert summary.patients_opted_out == 1
    # the Patient, their clinical resources, the Consent itself (and shared ones only they referred to)
    assert summary.sent["Patient"] == 11
    # per type, the objector's own resources are reported under their reason, and the counts add up
    opted_out = summary.dropped["opted-out"]
    # the total is the sum of those (it counted the shared Practitioners only the objector referred to too)
    assert summary.resources_opted_out == sum(opted_out.values()) == 1 + 8 + 1
    assert opted_out["Patient"] == 1 and opted_out["Consent"] == 1
    assert sum(opted_out[t] for t in ("Encounter", "Observation", "Condition", "Procedure")) == 8
    for rtype in ("Patient", "Encounter", "Observation", "Condition", "Procedure", "Consent"):
        dropped = sum(per_type.get(rtype, 0) for per_type in summary.dropped.values())
        assert summary.resources_in[rtype] == summary.sent[rtype] + dropped, rtype
    assert "Practitioner" not in opted_out and "Organization" not in opted_out  # shared: once per job
    sent = resources(tmp_path / "out")
    assert sum(r["resourceType"] == "Patient" for r in sent) == 11
    raw = b"".join(p.read_bytes() for p in (tmp_path / "out").glob("*.json"))
    assert patient_id(5).encode() not in raw and b"MRN00000005" not in raw


def test_invalid_lines_are_reported_by_line_number_without_values(tmp_path: Path) -> None:
    write_export(
        tmp_path / "export",
        SynthSpec(patients=4, resources_per_patient=4, invalid_lines={"Observation": [2], "Condition": [3]}),
    )
    # a schema-invalid but well-formed line: reported by the chain, by number
    with (tmp_path / "export" / "Procedure.ndjson").open("ab") as f:
        f.write(
            orjson.dumps(
                {
                    "resourceType": "Procedure",
                    "id": "bad1",
                    "status": 42,
                    "subject": {"reference": f"Patient/{patient_id(1)}"},
                }
            )
            + b"\n"
        )
        # a control character in a string: refused by the chain's parse (it was listed as invalid-invalid)
        nul = {"resourceType": "Procedure", "id": "bad2", "status": "completed",
               "note": [{"text": "a\u0000"}], "subject": {"reference": f"Patient/{patient_id(1)}"}}
        f.write(orjson.dumps(nul) + b"\n")
    summary = run_bulk(
        [tmp_path / "export"], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out"
    )
    listed = {(f, n): reason for f, n, reason in summary.invalid_lines}
    assert listed[("Procedure.ndjson", 6)] == "invalid"
    assert listed[("Observation.ndjson", 2)] == "malformed-json"
    assert listed[("Condition.ndjson", 3)] == "malformed-json"
    assert listed[("Procedure.ndjson", 5)].startswith("rejected-")
    assert summary.sent["Patient"] == 4  # the rest of that patient's group still goes
    text = orjson.dumps(summary.as_dict())
    assert b"broken" not in text and b"MRN" not in text


def test_resume_after_interruption_stores_every_bundle_once(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=10, resources_per_patient=6))
    options = BulkOptions(group_size=2, bundle_size=10)
    with pytest.raises(StopAfter):
        run_bulk(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            to_dir=tmp_path / "out",
            options=BulkOptions(group_size=2, bundle_size=10, stop_after_groups=2),
        )
    first = {p.name for p in (tmp_path / "out").glob("*.json")}
    summary = run_bulk(
        [tmp_path / "export"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=options,
    )
    assert summary.groups_total == 5 and summary.groups_resumed == 2
    assert not (tmp_path / "w" / "index.db").exists()  # dropped once the job is finished
    names = {p.name for p in (tmp_path / "out").glob("*.json")}
    assert first < names
    assert sum(r["resourceType"] == "Patient" for r in resources(tmp_path / "out")) == 10


def test_a_work_dir_of_another_export_is_refused(tmp_path: Path) -> None:
    write_export(tmp_path / "a", SynthSpec(patients=2, resources_per_patient=2))
    write_export(tmp_path / "b", SynthSpec(patients=3, resources_per_patient=2))
    run_bulk([tmp_path / "a"], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")
    with pytest.raises(JobMismatch):
        run_bulk([tmp_path / "b"], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")


def test_groups_are_read_from_the_index_by_offset(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=5))
    files = resolve_sources([tmp_path / "export"])
    conn = ix.open_index(tmp_path / "index.db")
    stats = ix.build_index(
        conn, files, ix.Keyer(), group_size=4, max_group_resources=1000, max_line_bytes=1 << 20
    )
    assert stats.patients == 6 and ix.group_count(conn) == 2
    lines = ix.group_lines(conn, 0)
    assert {line.rtype for line in lines} >= {"Patient", "Encounter", "Organization", "Practitioner"}
    for line in lines:  # offsets point at exactly one line of the right type
        with files[line.file].path.open("rb") as f:
            f.seek(line.off)
            assert orjson.loads(f.read(line.length))["resourceType"] == line.rtype
    # nothing identifying is stored: no ids, names or numbers from the export, only offsets and keys
    dump = "\n".join(sqlite3.connect(tmp_path / "index.db").iterdump())
    assert patient_id(1) not in dump and "MRN" not in dump and "Dorpsstraat" not in dump


def test_group_memory_is_bounded_by_max_group_resources(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=10, resources_per_patient=20))
    files = resolve_sources([tmp_path / "export"])
    conn = ix.open_index(tmp_path / "index.db")
    ix.build_index(conn, files, ix.Keyer(), group_size=200, max_group_resources=50, max_line_bytes=1 << 20)
    sizes = [r[0] for r in conn.execute("SELECT resources FROM groups")]
    assert len(sizes) == 5 and max(sizes) <= 50


def test_manifest_must_stay_inside_the_import_folder(tmp_path: Path) -> None:
    write_export(tmp_path / "imports" / "x", SynthSpec(patients=1, resources_per_patient=1))
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps({"output": [{"type": "Patient", "url": "x/Patient.ndjson"}]}))
    assert len(resolve_sources([good], allowed_root=tmp_path / "imports")) == 1
    for url in ("../secret.ndjson", "/etc/passwd", "https://example.org/Patient.ndjson"):
        bad = tmp_path / "bad.json"
        bad.write_bytes(orjson.dumps({"output": [{"type": "Patient", "url": url}]}))
        with pytest.raises(SourceError):
            resolve_sources([bad], allowed_root=tmp_path / "imports")


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    """A probe: a folder and a file in it, or a manifest listing one file again under `./`, delivered every
    resource of it twice."""
    export = tmp_path / "export"
    write_export(export, SynthSpec(patients=3, resources_per_patient=4))
    observations = export / "Observation.ndjson"
    manifest = tmp_path / "manifest.json"
    urls = ["export/Observation.ndjson", "./export/Observation.ndjson", "export/../export/Observation.ndjson"]
    manifest.write_bytes(orjson.dumps({"output": [{"type": "Observation", "url": u} for u in urls]}))
    lines = observations.read_bytes().count(b"\n")
    summary = run_bulk(
        [export, observations, manifest],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=BulkOptions(workers=0),
    )
    sent = [e for b in bundles(tmp_path / "out") for e in b["entry"]]
    sent = [e for e in sent if e["resource"]["resourceType"] == "Observation"]
    assert summary.resources_in["Observation"] == lines == len(sent) > 0
    assert summary.invalid_lines == []


def _to_dir(tmp_path: Path, chains, options: BulkOptions):  # noqa: ANN001, ANN202 - Chains, BulkSummary
    """The export under tmp_path/export, delivered as files into tmp_path/out (work dir tmp_path/w)."""
    run = run_bulk_async(
        [tmp_path / "export"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        chains=chains,
        sink=DirSink(tmp_path / "out"),
        options=options,
    )
    return asyncio.run(run)


def _outbox(tmp_path: Path) -> tuple[Store, StoreSink]:
    """A gateway store on SQLite and the bulk sink that writes into it."""
    store = open_store(f"sqlite:///{tmp_path / 'gw.db'}")
    return store, StoreSink(store, provider="ura:00000000", registry=REGISTRY, sender="test")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    with serve(create_receiver_app(tmp_path / "recv")) as base:
        yield base


def test_resume_through_the_outbox_delivers_each_bundle_exactly_once(tmp_path: Path, receiver: str) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=9, resources_per_patient=6))
    store, sink = _outbox(tmp_path)
    chains = offline_chains(REGISTRY, tmp_path / "w")
    options = BulkOptions(group_size=2, bundle_size=8)

    async def go() -> None:
        with pytest.raises(StopAfter):
            await run_bulk_async(
                [tmp_path / "export"],
                registry=REGISTRY,
                work_dir=tmp_path / "w",
                chains=chains,
                sink=sink,
                options=BulkOptions(group_size=2, bundle_size=8, stop_after_groups=3),
            )
        await _forward(store, receiver)  # what was stored before the interruption is delivered
        summary = await run_bulk_async(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            chains=chains,
            sink=sink,
            options=options,
        )
        assert summary.groups_resumed == 3
        # replaying a finished job stores nothing new
        stored = sum(store.depth().values())
        again = await run_bulk_async(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            chains=chains,
            sink=sink,
            options=options,
        )
        assert again.groups_resumed == again.groups_total and sum(store.depth().values()) == stored
        await _forward(store, receiver)

    asyncio.run(go())
    counts = httpx.get(f"{receiver}/_accepted").json()
    assert counts and set(counts.values()) == {1}
    assert store.depth()["delivered"] == len(counts)
    accepted = [
        a for a in store.list_audit(registry=REGISTRY, limit=1000) if _field(a, "event") == "accepted"
    ]
    assert len(accepted) == len(counts)  # one audit line per Bundle, not one per re-run
    patients = [d for d in httpx.get(f"{receiver}/deliveries").json()]
    assert sum((d.get("resourceCounts") or {}).get("Patient", 0) for d in patients) == 9


def _field(row, name: str):  # noqa: ANN001, ANN202 - an AuditEvent or its dict form
    return row.get(name) if isinstance(row, dict) else getattr(row, name)


async def _forward(store, receiver: str) -> None:  # noqa: ANN001
    client = RegistryClient(receiver, timeout=10)
    worker = OutboxWorker(
        store, {REGISTRY: client}, poll_interval=0.01, metrics=GatewayMetrics.create(CollectorRegistry())
    )
    try:
        while await worker.run_once():
            pass
    finally:
        await client.aclose()


def _references(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def test_worker_processes_deliver_what_the_in_process_run_delivers(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=9, resources_per_patient=6, objecting={4}))
    results = {}
    for workers in (0, 2):
        summary = run_bulk(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / f"w{workers}",
            to_dir=tmp_path / f"out{workers}",
            options=BulkOptions(group_size=2, workers=workers),
        )
        results[workers] = (
            dict(summary.sent),
            summary.patients_opted_out,
            summary.groups_done,
            summary.bundles,
        )
    assert results[0] == results[2]
    assert results[2][0]["Patient"] == 8


class _CrashingSink(DirSink):
    """Dies after `left` Bundles, half-way through a group (a power cut between two outbox writes)."""

    def __init__(self, folder: Path, left: int) -> None:
        super().__init__(folder)
        self.left = left

    def put(self, key: str, payload: bytes, *, order_key: str | None, counts: dict, **more: object) -> bool:
        if self.left == 0:
            raise OSError("simulated crash")
        self.left -= 1
        return super().put(key, payload, order_key=order_key, counts=counts, **more)


def test_a_group_cut_off_half_way_is_redone_without_duplicates(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=8, resources_per_patient=6))
    options = BulkOptions(group_size=4, bundle_size=8)
    chains = offline_chains(REGISTRY, tmp_path / "w")
    with pytest.raises(OSError):
        asyncio.run(
            run_bulk_async(
                [tmp_path / "export"],
                registry=REGISTRY,
                work_dir=tmp_path / "w",
                chains=chains,
                sink=_CrashingSink(tmp_path / "out", 3),
                options=options,
            )
        )
    assert len(list((tmp_path / "out").glob("*.json"))) == 3
    summary = _to_dir(tmp_path, chains, options)
    assert summary.bundles_already_stored == 3 and summary.groups_resumed == 0
    assert sum(r["resourceType"] == "Patient" for r in resources(tmp_path / "out")) == 8


class _RecordingTTP:
    def __init__(self, backend) -> None:  # noqa: ANN001
        self.backend, self.batches = backend, []

    async def pseudonymise(self, registry, items):  # noqa: ANN001, ANN201
        self.batches.append(list(items))
        return await self.backend.pseudonymise(registry, items)

    async def probe(self) -> None:
        return None


def test_one_ttp_batch_per_group_and_never_an_objecting_patient(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=30, resources_per_patient=3, objecting={5, 17}))
    chains = offline_chains(REGISTRY, tmp_path / "w")
    recorder = _RecordingTTP(chains.provider.ttp)
    chains = dataclasses.replace(chains, provider=dataclasses.replace(chains.provider, ttp=recorder))
    summary = _to_dir(tmp_path, chains, BulkOptions(group_size=15, patients_per_call=4))
    assert summary.groups_total == 2 and len(recorder.batches) == 2 == summary.ttp_batches
    assert summary.patients_opted_out == 2 and summary.sent["Patient"] == 28
    sent = {item.value for batch in recorder.batches for item in batch}
    for n in (5, 17):
        patient = orjson.loads((tmp_path / "export" / "Patient.ndjson").read_bytes().splitlines()[n])
        extraction = extract_inputs(patient, chains.registry.types, chains.mapping, None)
        objecting = {p.value for p in chains.provider.source.pre_pseudonyms(extraction, REGISTRY)}
        assert objecting and not objecting & sent


def test_cli_to_dir_writes_bundles_and_a_summary(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from gateway.bulk.commands import bulk

    write_export(tmp_path / "export", SynthSpec(patients=3, resources_per_patient=4))
    app = typer.Typer()
    app.command()(bulk)
    args = [
        str(tmp_path / "export"),
        "--registry",
        REGISTRY,
        "--to-dir",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "w"),
        "--json",
        "--workers",
        "0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"patients": 3' in result.output
    assert len(list((tmp_path / "out").glob("*.json"))) >= 1
    both = CliRunner().invoke(app, [str(tmp_path / "export"), "--registry", REGISTRY])
    assert both.exit_code == 2  # neither --config nor --to-dir


def test_conditional_and_urn_uuid_patient_references_group_with_their_patient(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=4, resources_per_patient=1))
    uuid_id = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"
    with (tmp_path / "export" / "Patient.ndjson").open("ab") as f:
        f.write(
            orjson.dumps(
                {
                    "resourceType": "Patient",
                    "id": uuid_id,
                    "gender": "female",
                    "birthDate": "1950-01-01",
                    "name": [{"family": "Visser"}],
                }
            )
            + b"\n"
        )
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    }
    with (tmp_path / "export" / "Observation.ndjson").open("ab") as f:
        cond = {"reference": f"Patient?identifier={MRN_SYSTEM}|MRN00000002"}
        f.write(orjson.dumps(obs | {"id": "cond1", "subject": cond}) + b"\n")
        f.write(orjson.dumps(obs | {"id": "urn1", "subject": {"reference": f"urn:uuid:{uuid_id}"}}) + b"\n")
    files = resolve_sources([tmp_path / "export"])
    conn = ix.open_index(tmp_path / "index.db")
    ix.build_index(conn, files, ix.Keyer(), group_size=1, max_group_resources=100, max_line_bytes=1 << 20)
    owners = dict(
        conn.execute("""SELECT o.line, p.line FROM resources o JOIN resources p ON p.id = o.owner
                        WHERE o.rtype = 'Observation'""")
    )
    # Observation line 1 -> Patient line 3 (MRN00000002); line 2 -> the appended uuid Patient (line 5)
    assert owners == {1: 3, 2: 5}
    summary = run_bulk(
        [tmp_path / "export"], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out"
    )
    assert summary.sent["Patient"] == 5 and summary.sent["Observation"] == summary.resources_in["Observation"]


def test_an_over_long_line_is_reported_without_reading_it_whole(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=2, resources_per_patient=2))
    with (tmp_path / "export" / "Encounter.ndjson").open("ab") as f:
        f.write(b'{"resourceType":"Encounter","note":"' + b"x" * 300_000 + b'"}\n')
        f.write(
            orjson.dumps(
                {
                    "resourceType": "Encounter",
                    "id": "after",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": f"Patient/{patient_id(0)}"},
                }
            )
            + b"\n"
        )
    summary = run_bulk(
        [tmp_path / "export"],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=BulkOptions(max_line_bytes=100_000),
    )
    assert ("Encounter.ndjson", 3, "line-too-long") in summary.invalid_lines
    assert summary.sent["Encounter"] == 3  # the line after it is read at its right offset


def test_pool_workers_run_at_lower_priority(tmp_path: Path) -> None:
    """Chain workers add `worker_nice` to their niceness: live deliveries and forwarding go first."""
    import os

    from gateway.bulk.pool import ChainSpec, PoolRunner

    runner = PoolRunner(ChainSpec("example-generic", offline_root=tmp_path), 1, [], 10, nice=5)
    try:
        worker_nice = runner._pool.submit(os.nice, 0).result(timeout=120)
    finally:
        runner.close()
    assert worker_nice == min(19, os.nice(0) + 5)


def test_a_completed_job_run_again_neither_indexes_nor_sends(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    write_export(tmp_path / "export", SynthSpec(patients=5, resources_per_patient=4, objecting={1}))
    kwargs = {"registry": REGISTRY, "work_dir": tmp_path / "w", "to_dir": tmp_path / "out"}
    first = run_bulk([tmp_path / "export"], options=BulkOptions(group_size=2), **kwargs)
    written = sorted(p.name for p in (tmp_path / "out").glob("*.json"))

    def no_index(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a completed job indexed its export again")

    monkeypatch.setattr(ix, "build_index_file", no_index)
    again = run_bulk([tmp_path / "export"], options=BulkOptions(group_size=2), **kwargs)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == written
    assert again.groups_resumed == again.groups_total == first.groups_total == 3
    expected = first.as_dict() | {"groupsResumed": 3, "seconds": again.seconds}
    assert again.as_dict() == expected  # the first run's counts, per type and reason


def test_a_group_redone_with_other_bundles_loses_no_patient(tmp_path: Path) -> None:
    """The redone group need not cut its Bundles as the first run did (here: other slices; in life an
    objection registered in between, or a patient the TTP could not answer for). A Bundle is identified by
    the patients it carries, so a stored Bundle is skipped only when the redone one carries the same."""
    write_export(tmp_path / "export", SynthSpec(patients=12, resources_per_patient=4))
    chains = offline_chains(REGISTRY, tmp_path / "w")
    runs = {"first": (_CrashingSink(tmp_path / "out", 2), 2), "again": (DirSink(tmp_path / "out"), 5)}
    for name, (sink, per_call) in runs.items():
        options = BulkOptions(group_size=12, bundle_size=500, patients_per_call=per_call)
        run = run_bulk_async(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            chains=chains,
            sink=sink,
            options=options,
        )
        if name == "first":
            with pytest.raises(OSError):
                asyncio.run(run)
        else:
            summary = asyncio.run(run)
    assert summary.groups_resumed == 0
    patients = [r["id"] for r in resources(tmp_path / "out") if r["resourceType"] == "Patient"]
    assert len(set(patients)) == 12  # every patient reached the registry (some twice: an idempotent upsert)


class _UnreachableRegister:
    """Stands in for an objection register that cannot be reached (a store outage cannot be staged here)."""

    async def check(self, patients):  # noqa: ANN001, ANN201
        from gateway.optout.base import Decision, Reason

        return {p.key: Decision("unknown", Reason.REGISTER_UNAVAILABLE) for p in patients}


def test_an_unreachable_opt_out_source_stops_the_job_instead_of_dropping_patients(tmp_path: Path) -> None:
    from gateway.optout.base import OptOutUnavailable

    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=3))
    chains = offline_chains(REGISTRY, tmp_path / "w")
    register_down = dataclasses.replace(chains.registry, optout=(_UnreachableRegister(),))
    down = dataclasses.replace(chains, registry=register_down)
    kwargs = {"registry": REGISTRY, "work_dir": tmp_path / "w", "options": BulkOptions(group_size=3)}
    export, sink = [tmp_path / "export"], DirSink(tmp_path / "out")
    with pytest.raises(OptOutUnavailable):
        asyncio.run(run_bulk_async(export, chains=down, sink=sink, **kwargs))
    assert not list((tmp_path / "out").glob("*.json"))  # nothing of the group was stored
    summary = asyncio.run(run_bulk_async(export, chains=chains, sink=sink, **kwargs))
    assert summary.patients_unknown_optout == 0 and summary.sent["Patient"] == 6  # resumed once it answers


def test_invalid_lines_name_a_file_only_by_its_export_name(tmp_path: Path) -> None:
    """A second probe: a manifest's own file name ('999911120.ndjson') came back in the job status."""
    write_export(
        tmp_path / "export", SynthSpec(patients=3, resources_per_patient=2, invalid_lines={"Encounter": [1]})
    )
    (tmp_path / "export" / "Patient-MRN00042-999911120.ndjson").write_bytes(b'{"resourceType": broken\n')
    # a third: a surname and a BSN in the shape of an export's numbered file, and a birth date after a type
    (tmp_path / "export" / "Vanderwoude_123456782.ndjson").write_bytes(b'{"resourceType": broken\n')
    (tmp_path / "export" / "Observation_19610714.ndjson").write_bytes(b'{"resourceType": broken\n')
    summary = run_bulk(
        [tmp_path / "export"], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out"
    )
    files = {name for name, _, _ in summary.invalid_lines}
    assert "Encounter.ndjson" in files and len(files) == 4
    shown = orjson.dumps(summary.as_dict()).decode()
    for value in ("MRN00042", "999911120", "Vanderwoude", "123456782", "19610714"):
        assert value not in shown


# valid R4 (a required choice element as a primitive's extensions only); the R4B models want a value
IMMUNIZATION_WITHOUT_DATE = {"id": "imm-1", **immunization_without_date("Patient/pat0000001")}


def _bulk_cli(tmp_path: Path, work: str, *extra: str):  # noqa: ANN202 - a click Result
    import typer
    from typer.testing import CliRunner

    from gateway.bulk.commands import bulk

    app = typer.Typer()
    app.command()(bulk)
    args = [str(tmp_path / "export"), "--registry", REGISTRY, "--to-dir", str(tmp_path / f"out-{work}")]
    args += ["--work-dir", str(tmp_path / work), "--json", "--workers", "0", *extra]
    return CliRunner().invoke(app, args)


def _summary(result) -> dict:  # noqa: ANN001
    return orjson.loads(result.stdout[result.stdout.index("{") :])


def test_cli_strict_rejects_the_lines_only_the_r4b_models_refuse(tmp_path: Path) -> None:
    """`bulk --strict`: a line the R4B models refuse is dropped as rejected, named by file and line, and the
    command exits 1; the rest is delivered. Without --strict that line goes too."""
    write_export(tmp_path / "export", SynthSpec(patients=3, resources_per_patient=4))
    line = orjson.dumps(IMMUNIZATION_WITHOUT_DATE) + b"\n"
    (tmp_path / "export" / "Immunization.ndjson").write_bytes(line)
    plain = _bulk_cli(tmp_path, "plain")
    assert plain.exit_code == 0, plain.output
    assert _summary(plain)["sent"]["Immunization"] == 1
    strict = _bulk_cli(tmp_path, "strict", "--strict")
    assert strict.exit_code == 1, strict.output
    summary = _summary(strict)
    assert summary["dropped"]["rejected-400"] == {"Immunization": 1}
    assert "Immunization" not in summary["sent"]
    line_named = {"file": "Immunization.ndjson", "line": 1, "reason": "rejected-invariant"}
    assert summary["invalidLines"] == [line_named]


def test_each_rejected_line_gets_the_code_of_its_own_issue(tmp_path: Path) -> None:
    """Two lines refused in one Bundle for different reasons: each is named with its own issue type (a
    fresh-eyes test saw every line of the group labelled with the first line's)."""
    write_export(tmp_path / "export", SynthSpec(patients=3, resources_per_patient=4))
    observations = tmp_path / "export" / "Observation.ndjson"
    first, second, *rest = observations.read_bytes().splitlines()
    dated = orjson.loads(first)
    dated["effectiveDateTime"] = "2026-02-30"  # not a calendar date: a value issue
    statusless = orjson.loads(second)
    del statusless["status"]  # a required element missing: a required issue
    observations.write_bytes(b"\n".join([orjson.dumps(dated), orjson.dumps(statusless), *rest]) + b"\n")
    result = _bulk_cli(tmp_path, "w")
    assert result.exit_code == 1, result.output
    reasons = {(line["line"], line["reason"]) for line in _summary(result)["invalidLines"]}
    assert reasons == {(1, "rejected-value"), (2, "rejected-required")}


def test_bulk_wait_follows_only_the_bundles_of_its_own_run(tmp_path: Path) -> None:
    """`bulk --config` waited for the registry's whole outbox, so one live delivery in a long backoff kept
    it running after its own export had arrived (a fresh-eyes finding). It follows its own deliveries."""
    import asyncio
    from types import SimpleNamespace

    from gateway.bulk.commands import _drain
    from gateway.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'gateway.db'}")
    ids = [
        store.enqueue(provider="p", registry="r", payload=b"{}", sender="t", idempotency_key=f"k{n}")[0]
        for n in range(4)
    ]
    mine, live = ids[:3], ids[3]  # the live one stays queued, as if in a backoff
    seen: list[int] = []

    async def deliver_mine() -> None:
        for delivery in store.claim_batch("test", 10, 60):
            if delivery.id == mine[1]:
                store.mark_dead(delivery.id, "test", "rejected")
            elif delivery.id != live:
                store.mark_delivered(delivery.id, "test")

    async def run() -> None:
        waiting = asyncio.create_task(_drain(SimpleNamespace(store=store), mine, seen.append, poll=0.01))
        await asyncio.sleep(0.05)
        assert not waiting.done() and seen[-1] == 0
        await deliver_mine()
        await asyncio.wait_for(waiting, 5)

    asyncio.run(run())
    assert seen[-1] == 3 and store.get(live).status != "delivered"


def test_cli_to_dir_runs_offline_with_a_configuration_exported(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """With FHIR_GATEWAY_CONFIG exported (as README's hospital set-up does for `serve`), `--to-dir` failed:
    'give exactly one of --config or --to-dir'."""
    monkeypatch.setenv("FHIR_GATEWAY_CONFIG", str(tmp_path / "gateway.yaml"))
    write_export(tmp_path / "export", SynthSpec(patients=2, resources_per_patient=2))
    result = _bulk_cli(tmp_path, "w")
    assert result.exit_code == 0, result.output
    assert _summary(result)["sent"]["Patient"] == 2


def test_absolute_references_to_resources_of_the_export_resolve(tmp_path: Path) -> None:
    """A server that writes absolute references (`https://ehr.example.org/fhir/Patient/pb`): pass 1 grouped
    them with their patient, but the chain found no entry with that URL and rejected the lines."""
    base = "https://ehr.example.org/fhir/"
    export = tmp_path / "export"
    export.mkdir()
    patient = {"resourceType": "Patient", "id": "pb", "gender": "female", "birthDate": "1950-01-01"}
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "eb",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"{base}Patient/pb"},
    }
    lines = [
        obs | {"id": "o1", "subject": {"reference": f"{base}Patient/pb"}},
        obs
        | {
            "id": "o2",
            "subject": {"reference": "Patient/pb"},
            "encounter": {"reference": f"{base}Encounter/eb"},
        },
        obs | {"id": "o3", "subject": {"reference": f"{base}Patient/pb/_history/2"}},
    ]
    (export / "Patient.ndjson").write_bytes(orjson.dumps(patient))
    (export / "Encounter.ndjson").write_bytes(orjson.dumps(encounter))
    (export / "Observation.ndjson").write_bytes(b"\n".join(map(orjson.dumps, lines)))
    summary = run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")
    assert summary.invalid_lines == [] and summary.dropped == {}
    assert summary.sent["Observation"] == 3 and summary.sent["Encounter"] == 1
    (bundle,) = bundles(tmp_path / "out")
    patient_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    subjects = [e["resource"]["subject"]["reference"] for e in bundle["entry"] if "subject" in e["resource"]]
    assert subjects == [patient_url] * 4  # the Encounter and the three Observations: all point at the Patient


def test_the_processing_record_counts_what_a_yearly_delivery_withheld(tmp_path: Path, receiver: str) -> None:
    """A fourth probe: the bulk jobs' objecting patients appeared nowhere in the processing record, and its
    counts mixed bulk-only keys (a summed group number) with the posted deliveries'."""
    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=4, objecting={1, 4}))
    store, sink = _outbox(tmp_path)
    chains = offline_chains(REGISTRY, tmp_path / "w")

    async def go() -> None:
        options = BulkOptions(group_size=3)
        await run_bulk_async(
            [tmp_path / "export"],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            chains=chains,
            sink=sink,
            options=options,
        )
        await _forward(store, receiver)

    asyncio.run(go())
    record = store.processing_record(REGISTRY)
    assert record["withheld"]["patientsDroppedOptOut"] == 2
    assert record["withheld"]["dropped"]["opted-out"]["Patient"] == 2
    assert record["delivered"]["resourcesDelivered"] > 0 and "group" not in record["delivered"]
    # a probe of the privacy officer's side: bulk deliveries counted no patients and no pseudonym types,
    # and what bulk withheld outnumbered what came in
    assert record["delivered"]["patients"] == 4
    assert record["pseudonymTypes"] == ["GG"]  # what the synthetic patients allow
    assert record["withheld"]["resourcesIn"] >= record["withheld"]["resourcesDroppedOptOut"]
    assert record["events"]["withheld"] == 2  # one per group that kept something back
    # a probe: a group's withheld event counted every patient and line of the group, so that its delivered
    # patients were counted in both sections; now the withheld ones only, and both figures at the top
    assert record["withheld"]["patients"] == 2
    assert record["withheld"]["resourcesIn"] == record["withheld"]["resourcesDroppedOptOut"] == 12
    assert (record["patientsDelivered"], record["patientsWithheld"]) == (4, 2)
    assert record["withheld"]["optOutReasons"] == {"consent-deny": 2}  # why, as for posted Bundles
    # a probe: bulk deliveries had no resourcesIn (fewer came in than were delivered, in the record)
    delivered = record["delivered"]
    kept = sum(n for rtype, n in delivered["resources"].items() if rtype != "Provenance")
    assert delivered["resourcesIn"] == delivered["resourcesDelivered"] == kept > 0
    assert delivered["resources"]["Patient"] == 4


def test_what_came_in_is_what_was_delivered_plus_what_was_withheld_in_the_processing_record(
    tmp_path: Path, receiver: str
) -> None:
    """A probe: a RelatedPerson (a type the registry does not get) was in the record's `dropped` but in no
    `resourcesIn`, so the record said fewer resources came in than the job had read."""
    export = tmp_path / "export"
    write_export(export, SynthSpec(patients=4, resources_per_patient=4, objecting={2}))
    relative = {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{patient_id(0)}"}}
    (export / "RelatedPerson.ndjson").write_bytes(orjson.dumps(relative) + b"\n")
    store, sink = _outbox(tmp_path)

    async def go():  # noqa: ANN202 - a BulkSummary
        chains = offline_chains(REGISTRY, tmp_path / "w")
        summary = await run_bulk_async(
            [export], registry=REGISTRY, work_dir=tmp_path / "w", chains=chains, sink=sink
        )
        await _forward(store, receiver)
        return summary

    summary = asyncio.run(go())
    record = store.processing_record(REGISTRY)
    assert record["withheld"]["dropped"]["deid:type-not-allowed"] == {"RelatedPerson": 1}
    # the lines of no patient (shared resources nothing referred to) are the job's, not a delivery's
    of_patients = summary.lines - sum(summary.dropped["shared-not-referenced"].values())
    assert record["delivered"]["resourcesIn"] + record["withheld"]["resourcesIn"] == of_patients


def test_a_group_redone_after_an_interruption_records_what_it_withheld_once(tmp_path: Path) -> None:
    """The group's work was stored but the job stopped before it noted the group done: redone, its
    `withheld` event was written a second time and the processing record counted its objectors twice."""
    store, sink = _outbox(tmp_path)
    counts = {"bulkJob": "j", "group": "0", "patients": 3, "patientsDroppedOptOut": 1}
    sink.withheld("bulk|j|0", counts)
    sink.withheld("bulk|j|0", counts)  # the same group, redone
    sink.withheld("bulk|j|1", counts | {"group": "1"})
    record = store.processing_record(REGISTRY)
    assert record["events"]["withheld"] == 2
    assert record["withheld"]["patientsDroppedOptOut"] == 2


def test_one_export_run_from_two_work_dirs_into_one_store_is_stored_once(tmp_path: Path) -> None:
    """The job's id was random per work dir: the same export delivered from a second work dir (another
    host of the same store, a lost work dir) was stored, and delivered, a second time."""
    write_export(tmp_path / "export", SynthSpec(patients=9, resources_per_patient=4))
    store, sink = _outbox(tmp_path)
    chains = offline_chains(REGISTRY, tmp_path / "keys")  # one gateway's keys, as two hosts share them
    summaries = [
        asyncio.run(
            run_bulk_async(
                [tmp_path / "export"],
                registry=REGISTRY,
                work_dir=tmp_path / work_dir,
                chains=chains,
                sink=sink,
                options=BulkOptions(group_size=3),
            )
        )
        for work_dir in ("w1", "w2")
    ]
    first, second = summaries
    assert first.job == second.job and first.bundles == 3 and first.bundles_already_stored == 0
    assert (second.bundles, second.bundles_already_stored) == (0, 3)
    assert store.depth(REGISTRY)["queued"] == 3


def test_every_line_of_the_export_is_sent_or_dropped_once_per_type(tmp_path: Path) -> None:
    """A probe: to a registry that takes no Organization or Practitioner, every Bundle's copy of a shared
    one was counted as dropped, and the lines themselves again as never referenced (in 20, dropped 88). A
    shared line is now counted once: sent, dropped for its reason, or never referenced."""
    import yaml

    from gateway.config import REPO_ROOT

    raw = yaml.safe_load((REPO_ROOT / "profiles" / f"{REGISTRY}.yaml").read_text())
    for rtype in ("Organization", "Practitioner", "PractitionerRole"):
        raw["resources"].pop(rtype)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / f"{REGISTRY}.yaml").write_text(yaml.safe_dump(raw))
    write_export(tmp_path / "export", SynthSpec(patients=12, resources_per_patient=6, objecting={3}))
    chains = offline_chains(REGISTRY, tmp_path / "k", profiles_dir=tmp_path / "p")
    summary = _to_dir(tmp_path, chains, BulkOptions(group_size=4, patients_per_call=2)).as_dict()
    for rtype, lines in summary["resourcesIn"].items():
        dropped = sum(per_type.get(rtype, 0) for per_type in summary["dropped"].values())
        sent = summary["sent"].get(rtype, 0)
        assert sent + dropped == lines, (rtype, lines, sent, summary["dropped"])
    not_taken = summary["dropped"]["deid:type-not-allowed"]
    unreferenced = summary["dropped"].get("shared-not-referenced", {})
    for rtype in ("Organization", "Practitioner"):  # the lines some patient refers to, once each
        assert 0 < not_taken[rtype] == summary["resourcesIn"][rtype] - unreferenced.get(rtype, 0)
    assert summary["invalidLines"] == []  # a drop by the profile is no bad line
