"""The OpenAPI document: valid, and built from the routes the API serves, so the two cannot drift."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from nap_orch.api import openapi
from nap_orch.api.app import make_app, served
from nap_orch.config import Settings


@pytest.fixture
def routes():
    return served(make_app(Settings()))


def test_the_document_is_valid_openapi_and_covers_every_route(routes):
    doc = openapi.document(routes)
    validate(doc)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(m, p) for m, p in routes if m != "HEAD"}
    assert ("POST", "/v1/apps/{app}/instances") in documented and ("GET", "/v1/openapi.json") in documented


def test_a_route_without_an_operation_or_an_operation_without_a_route_fails_the_build(routes):
    with pytest.raises(KeyError, match="GET /v1/made-up"):
        openapi.document([*routes, ("GET", "/v1/made-up")])
    with pytest.raises(KeyError, match="documented but not served: GET /v1/whoami"):
        openapi.document([r for r in routes if r != ("GET", "/v1/whoami")])


def test_every_path_parameter_is_declared_and_errors_have_the_error_body(routes):
    doc = openapi.document(routes)
    for path, ops in doc["paths"].items():
        for method, operation in ops.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(openapi.PARAM.findall(path)), (method, path)
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            # an operation that needs a token may answer 401; a public one says it needs none
            assert ("401" in operation["responses"]) == (operation.get("security") != [])
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "requestBody" in doc["paths"]["/v1/apps"]["post"]
