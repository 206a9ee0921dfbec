"""Shared fixtures. `pg_url`: a PostgreSQL URL whose search_path is a fresh schema, dropped afterwards.

Without a reachable server the PostgreSQL tests are skipped (with the reason) unless CI is set: in CI a
missing server must fail the run, not silently shrink it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

PG_BASE_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _admin_connect() -> Any:
    import psycopg  # imported here: SQLite-only test runs need no libpq

    return psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=3)


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        admin = _admin_connect()
    except Exception as exc:  # any failure to reach the server
        reason = f"PostgreSQL not reachable at {PG_BASE_URL} ({type(exc).__name__})"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI is set")
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in PG_BASE_URL else "?"
        try:
            yield f"{PG_BASE_URL}{sep}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
