"""The `fhir-gateway` command line."""

from __future__ import annotations

import typer

from gateway import __version__

app = typer.Typer(no_args_is_help=True, add_completion=False, help="FHIR delivery gateway (pseudonymisation at the source).")


@app.callback()
def main() -> None:
    """FHIR delivery gateway: validate, opt-out, pseudonymise, de-identify and forward FHIR to registries."""


@app.command()
def version() -> None:
    """Print the gateway version."""
    typer.echo(__version__)


if __name__ == "__main__":
    app()
