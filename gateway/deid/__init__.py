"""De-identification driven by registry delivery profiles, and the leak gate.

Public API: ``load_profile``/``load_profiles``/``check_profile`` (profile.py), ``load_rules``/``check_rules``
(rules.py), ``compile_plan``/``deidentify`` (engine.py), ``sensitive_values``/``scan`` (leakscan.py).
"""

from gateway.deid.engine import DeidReport, DeidResult, Plan, ProvenanceInfo, compile_plan, deidentify
from gateway.deid.leakscan import Finding, SensitiveSet, scan, sensitive_values
from gateway.deid.profile import Profile, ProfileError, check_profile, load_profile, load_profiles
from gateway.deid.rules import Rules, RulesError, check_rules, load_rules

__all__ = [
    "DeidReport",
    "DeidResult",
    "Finding",
    "Plan",
    "Profile",
    "ProfileError",
    "ProvenanceInfo",
    "Rules",
    "RulesError",
    "SensitiveSet",
    "check_profile",
    "check_rules",
    "compile_plan",
    "deidentify",
    "load_profile",
    "load_profiles",
    "load_rules",
    "scan",
    "sensitive_values",
]
