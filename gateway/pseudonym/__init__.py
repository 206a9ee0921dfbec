"""NLPS1 pseudonymisation: input extraction, normalisation and the source stage (domain spec §4)."""
