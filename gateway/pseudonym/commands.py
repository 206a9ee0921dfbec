"""CLI commands of the pseudonym package. The lead wires `selftest` as `fhir-gateway selftest --vectors FILE`;
`app` is a stand-alone group so the command can be tested (and run) on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.pseudonym.mapping import MappingError
from gateway.pseudonym.selftest import SelftestResult, VectorsError, run_selftest_detailed

app = typer.Typer(no_args_is_help=True, add_completion=False, help="NLPS1 pseudonym tools.")


@app.callback()
def _group() -> None:
    """NLPS1 pseudonym tools."""


@app.command("selftest")
def selftest(
    vectors: Annotated[
        Path,
        typer.Option(
            "--vectors",
            help="NLPS1 test vectors (pseudonym-vectors.json).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
) -> None:
    """Reproduce every NLPS1 test vector from its FHIR Patient; exit 1 on any difference."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        # Rich assumes 80 columns when piped (CI logs): too narrow for a case column plus ten type columns.
        console = Console(highlight=False, soft_wrap=True, width=130)
    try:
        result = run_selftest_detailed(vectors)
    except (VectorsError, MappingError) as exc:
        console.print(f"selftest: {exc}", markup=False)
        raise typer.Exit(code=2) from None
    console.print(result_table(result))
    for mismatch in result.mismatches:
        console.print(f"FAIL {mismatch}", markup=False)
    if result.mismatches:
        console.print(f"selftest: {len(result.mismatches)} difference(s) from the vectors", markup=False)
        raise typer.Exit(code=1)
    console.print("selftest: all vectors reproduced byte for byte", markup=False)


def result_table(result: SelftestResult) -> Table:
    """Rows: cases, rotation, other_registry; columns: NLPS1 types; cells ok / FAIL / blank (not checked)."""
    types: list[str] = []
    for row in result.rows:
        types.extend(t for t in result.checked[row] if t not in types)
    table = Table(title="NLPS1 test vectors")
    table.add_column("case", overflow="fold")
    for ptype in types:
        table.add_column(ptype, justify="center", no_wrap=True, min_width=4)
    for row in result.rows:
        cells = [_cell(result, row, t) for t in types]
        table.add_row(escape(row), *cells)
    return table


def _cell(result: SelftestResult, row: str, ptype: str) -> str:
    if ptype not in result.checked[row]:
        return ""
    return "[red]FAIL[/red]" if result.failed(row, ptype) else "[green]ok[/green]"
