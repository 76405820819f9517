"""The health rule (engines.health), the check's spelling in profiles and units."""

from __future__ import annotations

import pytest

from nap_orch import units
from nap_orch.engines.health import FAIL_LIMIT, Check, Health, judge, record
from nap_orch.errors import AppError
from nap_orch.ops.profile import AppSpec, parse_fields

NONE = Check("", "", 10, 2, 5, 3)
HTTP = Check("http", "/health", 10, 2, 5, 3)


def test_without_a_check_running_once_up_min_healthy():
    h = Health(started_at=100.0)
    assert judge(NONE, h, 102.9) == "starting"
    assert judge(NONE, h, 103.0) == "running"


def test_with_a_check_running_once_a_probe_passed_and_up_min_healthy():
    h = Health(started_at=100.0)
    assert judge(HTTP, h, 110) == "starting"
    record(h, True)
    assert judge(HTTP, h, 101) == "starting"  # passed, but not up 3 s yet
    assert judge(HTTP, h, 103) == "running"


def test_failures_in_a_row_restart_only_past_the_grace():
    h = Health(started_at=100.0)
    for _ in range(FAIL_LIMIT):
        record(h, False)
    assert judge(HTTP, h, 104) == "starting"  # within its 5 s grace
    assert judge(HTTP, h, 105) == "restart"
    record(h, True)  # a pass starts the count over
    assert h.failures == 0 and judge(HTTP, h, 200) == "running"


def test_a_unit_keeps_its_check():
    unit = units.Unit(
        name="a_web_common@1",
        description="d",
        argv=["/bin/sleep", "1"],
        workdir="/",
        env={},
        min_healthy=3,
        check="http /health?x=1",
        check_interval=2,
        check_timeout=0.5,
        check_grace=7,
    )
    text = units.render(unit)
    assert "X-Nap-Check=http /health?x=1" in text and "X-Nap-MinHealthySec=3" in text
    assert units.parse(text) == unit


@pytest.mark.parametrize("check", ["http", "http health", "udp", "tcp 22", "http /a b", "http http://x/"])
def test_a_bad_check_is_refused(check):
    with pytest.raises(ValueError):
        units.parse_check(check)


def spec(text: str) -> AppSpec:
    return AppSpec("common", "profile", text, parse_fields(text))


def test_profile_health_fields():
    got = spec("command: x\ncheck: tcp\ncheck_interval: 5s\ncheck_timeout: 200ms\ncheck_grace: 1min\n").health
    assert got == {"check": "tcp", "check_interval": 5.0, "check_timeout": 0.2, "check_grace": 60.0}
    assert spec("command: x\n").health == {}


@pytest.mark.parametrize(
    "text",
    [
        "check_interval: 5s\n",  # no check
        "check: tcp\ncheck_interval: 0\n",
        "check: tcp\ncheck_interval: forever\n",
        "check: tcp\ncheck_timeout: 20s\ncheck_interval: 10s\n",  # longer than the interval
        "check: tcp\ncheck_grace: -1\n",
        "check: http /x\x01\n",
    ],
)
def test_bad_health_fields_are_refused(text):
    with pytest.raises(AppError):
        spec("command: x\n" + text).health  # noqa: B018
