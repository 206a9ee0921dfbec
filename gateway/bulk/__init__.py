"""Bulk delivery of a FHIR Bulk Data export (the yearly delivery): see docs in `gateway/bulk/job.py`.

    summary = run_bulk([Path("export/")], runtime=runtime, registry="example-generic", work_dir=Path("job1"))
    summary = run_bulk([Path("export/")], to_dir=Path("out"), registry="example-generic",
                       work_dir=Path("job1"))

Pass 1 streams every file into an on-disk index (offsets and opaque keys, `gateway/bulk/index.py`); pass 2
runs the chain once per group of patients (one TTP batch each) and stores the resulting transaction Bundles
in the outbox (or a folder) under idempotency keys, so an interrupted run resumes without delivering twice.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: pass 1's scanner processes import `gateway.bulk.index` only, and must not pay for
# the whole chain (about 60 MB and 0.4 s of CPU per process) by importing this package.
_EXPORTS = {
    "BulkOptions": "gateway.bulk.job",
    "BulkSummary": "gateway.bulk.summary",
    "Chains": "gateway.bulk.group",
    "DirSink": "gateway.bulk.sinks",
    "JobMismatch": "gateway.bulk.job",
    "SourceError": "gateway.bulk.sources",
    "StopAfter": "gateway.bulk.job",
    "StoreSink": "gateway.bulk.sinks",
    "deliver_export": "gateway.bulk.job",
    "resolve_sources": "gateway.bulk.sources",
    "run_bulk": "gateway.bulk.run",
    "run_bulk_async": "gateway.bulk.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway.bulk' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
