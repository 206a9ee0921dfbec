"""Soak and load scripts (run by hand, not collected by pytest) and the helpers the CI fault tests share."""
