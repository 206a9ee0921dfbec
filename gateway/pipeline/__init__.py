"""Parse and validate: bytes → dict → (schema-valid resource, BundleIndex).

Status and issue codes (FHIR RESTful API: 400 = could not be parsed or failed basic validation,
413 = too large, 415 = wrong encoding, 422 = valid FHIR but violates this gateway's business rules):

| situation                                                      | status | issue code     |
|----------------------------------------------------------------|--------|----------------|
| body larger than max_bytes                                     | 413    | too-costly     |
| empty body                                                     | 400    | required       |
| UTF-16 / UTF-32 body (BOM or NUL pattern)                      | 415    | not-supported  |
| invalid UTF-8 (Latin-1, CP-1252, lone surrogates)              | 400    | structure      |
| leading UTF-8 BOM                                              | accepted (stripped)     |
| malformed or truncated JSON, trailing content                  | 400    | structure      |
| nesting deeper than max_depth (default 100)                    | 400    | too-costly     |
| duplicate property in an object                                | 400    | structure      |
| number overflowing a double, integer outside 64-bit range      | 400    | value          |
| top level not an object                                        | 400    | structure      |
| resourceType missing / not a string                            | 400    | required / structure |
| resourceType not an R4 resource                                | 400    | not-supported  |
| schema violations (unknown element, wrong type, bad date, ...) | 400    | structure, value, |
|                                                                |        | required, code-invalid |
| POSTed resource is not a Bundle                                | 422    | not-supported  |
| Bundle.type not transaction / batch / collection               | 422    | not-supported  |
| entry without resource (e.g. a DELETE request)                 | 422    | required       |
| duplicate fullUrl                                              | 422    | duplicate      |
| no Patient (when require_patient)                              | 422    | business-rule  |
| Patient inside `contained` or a nested Bundle/Parameters       | 422    | business-rule  |
| reference to a Patient not in the Bundle (literal, conditional, | 422    | not-found      |
| logical by identifier), or to a `urn:` not in the Bundle        |        |                |
| reference to another server / unresolved non-Patient reference | accepted, warning in BundleIndex.issues |

Accepted on purpose: two or more Patients (each is checked for opt-out and pseudonymised on its own; the
reference graph tells which resources belong to whom), circular references, a Patient without name or
birthDate (valid FHIR; the pseudonym types that need them are skipped downstream).
"""
