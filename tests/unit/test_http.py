"""What every HTTP server shares (``nap_orch.http``): JSON bodies, their depth and types."""

from __future__ import annotations

import json

import pytest

from nap_orch.http import MAX_DEPTH, json_type, nested_deeper


def nested(depth: int) -> object:
    return json.loads("[" * depth + "]" * depth)


def test_depth_counts_objects_and_lists_not_scalars():
    assert not nested_deeper({}, 1) and not nested_deeper("text", 0)
    assert not nested_deeper({"params": {"a": "x"}, "count": 2}, 2)
    assert nested_deeper({"params": {"a": ["x"]}}, 2)
    assert not nested_deeper(nested(MAX_DEPTH), MAX_DEPTH) and nested_deeper(nested(MAX_DEPTH + 1), MAX_DEPTH)


def test_depth_is_measured_without_recursion():
    deep: list = []
    for _ in range(100_000):  # deeper than Python's recursion limit
        deep = [deep]
    assert nested_deeper(deep, MAX_DEPTH)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "null"),
        (True, "a boolean"),
        (3, "a number"),
        (1.5, "a number"),
        ("x", "a string"),
        ({}, "an object"),
        ([], "a list"),
    ],
)
def test_json_types_in_jsons_words(value, name):
    assert json_type(value) == name
