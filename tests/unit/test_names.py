"""Names (``nap_orch.names``): the only shapes the platform accepts."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from nap_orch import units
from nap_orch.errors import BadRequest
from nap_orch.names import CONTROL_RE, InstanceName, Kind, check_name, control_character, is_unit_name, split_service


def test_instance_names_parse_into_their_parts():
    inst = InstanceName.parse("alice_web_mpi_slave@4-2.service")
    assert (inst.user, inst.app, inst.kind, inst.inst, inst.number) == ("alice", "web", Kind.MPI_SLAVE, "4-2", 4)
    assert inst.kind.mpi and not InstanceName.parse("alice_web_common@3").kind.mpi
    assert inst.name == "alice_web_mpi_slave@4-2" and inst.unit == "alice_web_mpi_slave@4-2.service"
    assert f"{inst.kind}" == "mpi_slave"  # a str enum: formats as its value


@pytest.mark.parametrize(
    "bad",
    [
        "alice_web",
        "alice_web_common@",
        "Alice_web_common@1",
        "alice_web_common@1/../x",
        "a_b_c_common@1",
        "alice_web_other@1",
        3,
        None,
    ],
)
def test_anything_else_is_not_an_instance_name(bad):
    with pytest.raises(BadRequest):
        InstanceName.parse(bad)


def test_an_instance_of_another_user_is_refused_when_the_user_is_given():
    with pytest.raises(BadRequest, match="names user 'bob'"):
        InstanceName.parse("bob_web_common@1", user="alice")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("alice_web_common@3", True),
        ("x", True),
        ("a..b", False),
        ("../x", False),
        ("a/b", False),
        ("x.service", False),
        ("", False),
        ("-x", False),
        ("a" * 202, False),
        (None, False),
    ],
)
def test_unit_names_are_safe_as_file_and_unit_names(name, ok):
    assert is_unit_name(name) is ok


def test_user_and_app_names():
    assert check_name("web-2") == "web-2"
    for bad in ("Web", "2web", "a_b", "a" * 32, ""):
        with pytest.raises(BadRequest):
            check_name(bad)
    assert split_service("alice_web") == ("alice", "web")
    with pytest.raises(BadRequest, match="you are 'bob'"):
        split_service("alice_web", user="bob")


def test_the_control_class_is_exactly_unicodes_control_surrogate_and_separator_categories():
    refused = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cs", "Zl", "Zp")}
    assert {c for c in range(sys.maxunicode + 1) if CONTROL_RE.fullmatch(chr(c))} == refused


@pytest.mark.parametrize("ch", ["\n", "\t", "\x00", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\ud800"])
def test_what_the_api_refuses_a_unit_refuses_too(ch):
    # the API's check (names.control_character) and the worker's (units.check_value) agree
    assert control_character(f"a{ch}b") == ch
    with pytest.raises(ValueError, match="control character"):
        units.check_value(f"a{ch}b", "value")


@pytest.mark.parametrize("text", ["a b", "caf\u00e9", "\u00a0nbsp", "\u200bzero-width", "\U0001f600", "\u3000"])
def test_ordinary_text_and_spaces_pass(text):
    assert control_character(text) is None
    assert units.check_value(text, "value") == text
