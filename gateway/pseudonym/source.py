"""The NLPS1 source stage (domain spec §4.1 step 4, §4.3): canonical strings → pre-pseudonyms, in the gateway.

Irreversible types: HMAC-SHA-256 under the ecosystem-wide K_src[v]. MRN: AES-SIV under the hospital's own
K_mrn[provider, registry, v]. All key objects are built once (HMAC is pre-keyed and copied per value, the
AES-SIV object is reused): deriving or building a key per call would cost more than the crypto itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.pseudonym.nlps1 import ProviderMrnKey, PseudonymError, SourceKey
from gateway.pseudonym.types import Extraction, PrePseudonym

MRN = "MRN"


class SourceStage:
    """Turns an Extraction into the pre-pseudonyms that go to the TTP; holds the hospital-side keys.

    `source_keys` maps K_src version → key bytes (≥ 256 bits); `source_version` is the version used for new
    pre-pseudonyms. `provider_mrn_master` is the hospital's MRN master key (None: the MRN type is not used).
    """

    def __init__(
        self,
        source_keys: Mapping[int, bytes],
        source_version: int,
        provider_mrn_master: bytes | None,
        provider: str,
    ) -> None:
        if source_version not in source_keys:
            raise PseudonymError("the current source key version has no key")
        if provider_mrn_master is not None and len(provider_mrn_master) < 32:
            raise PseudonymError("the provider MRN master key must be at least 256 bits")
        if not provider:
            raise PseudonymError("the provider id is required")
        self._source = {version: SourceKey(key, version) for version, key in source_keys.items()}
        self.source_version = source_version
        self.provider = provider
        self._mrn_master = provider_mrn_master
        # (registry, version) → key. Bounded by the configured registries × live versions; a lost race only
        # builds the same key twice.
        self._mrn_keys: dict[tuple[str, int], ProviderMrnKey] = {}

    @property
    def source_versions(self) -> frozenset[int]:
        return frozenset(self._source)

    @property
    def has_mrn_key(self) -> bool:
        """False: an MRN input makes pre_pseudonyms raise; check at start-up against the mrn_system."""
        return self._mrn_master is not None

    def pre_pseudonyms(
        self,
        extraction: Extraction,
        registry: str,
        *,
        mrn_version: int | None = None,
        source_version: int | None = None,
    ) -> list[PrePseudonym]:
        """One PrePseudonym per extracted input, in the extraction's order.

        `source_version` defaults to the current one; `mrn_version` defaults to the source version (K_mrn is
        rotated per registry, so a registry may run a different MRN version).
        """
        src_version = self.source_version if source_version is None else source_version
        source = self._source.get(src_version)
        if source is None:
            raise PseudonymError("no source key for the requested version")
        out: list[PrePseudonym] = []
        for item in extraction.inputs:
            if item.type == MRN:
                key = self.mrn_key(registry, src_version if mrn_version is None else mrn_version)
                out.append(PrePseudonym(MRN, key.version, key.pre(item.canonical)))
            else:
                out.append(PrePseudonym(item.type, src_version, source.pre(item.canonical)))
        return out

    def mrn_key(self, registry: str, version: int) -> ProviderMrnKey:
        """The cached K_mrn[provider, registry, version] (also reveals a returned MRN pre-pseudonym)."""
        key = self._mrn_keys.get((registry, version))
        if key is None:
            if self._mrn_master is None:
                raise PseudonymError("the MRN type needs a provider MRN master key, none is configured")
            key = ProviderMrnKey(self._mrn_master, self.provider, registry, version)
            self._mrn_keys[(registry, version)] = key
        return key
