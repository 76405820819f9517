"""Names (``nap_orch.names``): the only shapes the platform accepts."""

from __future__ import annotations

import pytest

from nap_orch.errors import BadRequest
from nap_orch.names import InstanceName, Kind, check_name, is_unit_name, split_service


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
