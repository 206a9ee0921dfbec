"""Stand-in servers (stubs) for external TTP and consent services, built from their published examples.

They are test doubles: they answer in the published request/response shapes but implement none of the real
products' storage, security or limits beyond what a test sets. Never run them outside tests.
"""
