"""FHIR delivery gateway: pseudonymisation at the source for Dutch quality registries."""

__version__ = "0.1.0"
