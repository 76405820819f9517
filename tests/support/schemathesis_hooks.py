"""Hooks for schemathesis' run against the live API (tests/integration/test_openapi.py).

A stream that follows (an event stream by default, a journal or an app's logs with ``follow``) answers
for as long as its client stays: the fuzzer's requests ask for what is there now (``follow=0``) and
end. Following is tested by the tests of the streams themselves.
"""

from __future__ import annotations

from typing import Any

import schemathesis

STREAMS = {"/v1/events", "/v1/jobs/{id}/events", "/v1/apps/{app}/logs", "/v1/instances/{name}/journal"}


@schemathesis.hook
def map_query(context: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    operation = context.operation
    if operation is not None and operation.path in STREAMS:
        return {**(query or {}), "follow": "0"}
    return query
