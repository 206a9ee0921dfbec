from gateway.outcome import FhirError, Issue, operation_outcome


def test_error_outcome_names_path_not_value():
    err = FhirError.single(
        422, "value", "birthDate is not a valid date", "Bundle.entry[0].resource.birthDate"
    )
    oo = err.outcome()
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"][0]["expression"] == ["Bundle.entry[0].resource.birthDate"]
    assert err.status == 422


def test_outcome_without_expression_omits_it():
    oo = operation_outcome([Issue("invalid", "bad")])
    assert "expression" not in oo["issue"][0]
