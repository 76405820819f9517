"""The app formats (``ops.profile``): fields, parameters, values."""

from __future__ import annotations

import pytest

from nap_orch.errors import AppError, BadRequest
from nap_orch.ops import profile


def spec(text: str, kind: str = "common") -> profile.AppSpec:
    filename = profile.PROFILE if kind == "common" else profile.MPI_XML
    return profile.AppSpec(kind, filename, text, profile.parse_fields(text))


def test_fields_are_key_value_lines_with_comments_and_blanks_skipped():
    s = spec("# a comment\ncommand: python3 app.py --port {port}\n\nMemory:  256m \nnot a field\nscale: 2\n")
    assert s.fields == {"command": "python3 app.py --port {port}", "memory": "256m", "scale": "2"}
    assert (s.memory, s.scale) == (256 * 1024**2, 2)


def test_parameters_are_the_users_words_in_first_seen_order():
    s = spec("command: run {b} {a} {port} {b} {instance} {host} {user} {app} {c-d}\n")
    assert s.parameters == ["b", "a", "c-d"]


@pytest.mark.parametrize(
    ("raw", "size"),
    [("1048576", 1024**2), ("4096k", 4 * 1024**2), ("2G", 2 * 1024**3), ("1 mib", 1024**2), ("1024t", 1024**5)],
)
def test_memory_sizes(raw, size):
    assert profile.parse_memory(raw) == size


@pytest.mark.parametrize("raw", ["99999999t", "1025t", "100", "64k", "0", "0m"])
def test_memory_sizes_a_limit_cannot_hold_are_refused(raw):
    with pytest.raises(AppError, match="out of range"):
        profile.parse_memory(raw)


@pytest.mark.parametrize("raw", ["lots", "-1m", "1.5g", "12q"])
def test_bad_memory_sizes_are_refused(raw):
    with pytest.raises(AppError, match="not a size"):
        profile.parse_memory(raw)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory: 1m\n", "no command"),
        ("command: run\nscale: 0\n", "not a positive whole number"),
        ("command: run 'unbalanced\n", "cannot be split"),
        ("command: run\nmemory: huge\n", "not a size"),
    ],
)
def test_validate_refuses_bad_profiles(text, message):
    with pytest.raises(AppError, match=message):
        profile.validate(spec(text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("from: a.c\n", "no hosts"),
        ("hosts: 0\ncommand: x\n", "at least 1"),
        ("hosts: 2\nfrom: a.c\n", "no to:"),
        ("hosts: 2\n", "needs from:"),
    ],
)
def test_validate_refuses_bad_mpi_xml(text, message):
    with pytest.raises(AppError, match=message):
        profile.validate(spec(text, "mpi"))


def test_values_must_be_known_strings_without_control_characters():
    assert profile.check_values({"a": "x y", "b": 3}, ["a", "b"]) == {"a": "x y", "b": "3"}
    with pytest.raises(BadRequest, match="unknown parameter"):
        profile.check_values({"zzz": "1"}, ["a"])
    with pytest.raises(BadRequest, match="must be a string"):
        profile.check_values({"a": ["x"]}, ["a"])
    with pytest.raises(BadRequest, match="control characters"):
        profile.check_values({"a": "x\ny"}, ["a"])
    with pytest.raises(BadRequest, match="must be an object"):
        profile.check_values(["a"], ["a"])  # type: ignore[arg-type]
    assert profile.missing({"a": "1"}, ["a", "b"]) == ["b"]


@pytest.mark.parametrize("ch", ["\x85", "\u2028", "\u2029", "\x1b", "\x7f", "\ud800"])
def test_unicode_line_breaks_and_controls_are_refused_in_values_and_names(ch):
    with pytest.raises(BadRequest, match=r"parameter a: control characters .*U\+"):
        profile.check_values({"a": f"x{ch}y"}, ["a"])
    with pytest.raises(BadRequest, match="parameter name .*control characters"):
        profile.check_values({f"a{ch}": "x"}, ["a"])


def test_values_and_params_are_bounded():
    assert profile.check_values({"a": "x" * profile.MAX_VALUE}, ["a"]) == {"a": "x" * profile.MAX_VALUE}
    with pytest.raises(BadRequest, match="parameter a: value is longer than 4096"):
        profile.check_values({"a": "x" * (profile.MAX_VALUE + 1)}, ["a"])
    many = {f"p{i}": "1" for i in range(profile.MAX_PARAMS + 1)}
    with pytest.raises(BadRequest, match="at most 100"):
        profile.check_values(many, list(many))
    with pytest.raises(BadRequest, match="longer than 128"):
        profile.check_values({"n" * 1000: "1"}, ["a"])
    with pytest.raises(BadRequest, match=r"unknown parameter\(s\) z{40}\.\.\.;"):  # quoted, not echoed whole
        profile.check_values({"z" * 100: "1"}, ["a"])


@pytest.mark.parametrize("value", [None, True, {"x": 1}, [1], float("nan"), float("inf")])
def test_values_of_other_types_are_refused(value):
    with pytest.raises(BadRequest, match="parameter a: value must be a string"):
        profile.check_values({"a": value}, ["a"])


def test_a_launch_needs_every_parameter():
    assert profile.launch_values({"a": "1", "b": 2}, ["a", "b"]) == {"a": "1", "b": "2"}
    with pytest.raises(BadRequest, match="missing parameter\\(s\\): b, c"):
        profile.launch_values({"a": "1"}, ["a", "b", "c"])


@pytest.mark.parametrize("para_str", [123, ["1"], None])
def test_para_str_must_be_a_string(para_str):
    with pytest.raises(BadRequest, match="para_str must be a string"):
        profile.para_str_to_params(para_str, ["a"])


def test_para_str_is_the_values_in_parameter_order():
    assert profile.para_str_to_params("1,two", ["a", "b"]) == {"a": "1", "b": "two"}
    assert profile.para_str_to_params("", []) == {}
    with pytest.raises(BadRequest, match="has 1 value"):
        profile.para_str_to_params("1", ["a", "b"])


def test_substitute_fills_known_words_and_leaves_other_braces():
    assert profile.substitute("{a}-{b}-{x} {not a word}", {"a": "1", "b": "{a}"}) == "1-{a}-{x} {not a word}"


def test_split_command_splits_like_a_shell_before_substitution():
    assert profile.split_command("python3 'my app.py' --name {name}") == ["python3", "my app.py", "--name", "{name}"]
    with pytest.raises(AppError, match="empty"):
        profile.split_command("   ")
