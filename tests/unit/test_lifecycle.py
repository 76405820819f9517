"""The pure parts of the lifecycle: what scale starts and removes, how app logs merge."""

from __future__ import annotations

import pytest

from nap_orch.cli.main import parser
from nap_orch.ops.instances.lifecycle import scale_plan
from nap_orch.ops.instances.logs import stamp


def test_scale_up_starts_the_difference():
    assert scale_plan([1, 2], 5) == (3, [])
    assert scale_plan([], 2) == (2, [])


def test_scale_down_removes_the_highest_numbers():
    assert scale_plan([4, 1, 9, 2], 2) == (0, [4, 9])
    assert scale_plan([1, 2, 3], 0) == (0, [1, 2, 3])


def test_scale_to_what_runs_changes_nothing():
    assert scale_plan([3, 7], 2) == (0, [])


def test_a_journal_line_sorts_by_its_time():
    lines = ["2026-01-02T00:00:00.010Z nap: b", "2026-01-01T23:59:59.999Z stdout[1]: a"]
    assert sorted(lines, key=stamp) == lines[::-1]


@pytest.mark.parametrize("count", ["-1", "x", "1.5"])
def test_scale_takes_zero_or_more(count, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["scale", "web", count])
    assert "scale" in capsys.readouterr().err


def test_the_lifecycle_commands_parse():
    args = parser().parse_args(["remove_app", "a_web_common@1", "a_web_common@2"])
    assert args.op == "remove_app" and args.instances == ["a_web_common@1", "a_web_common@2"] and not args.all
    args = parser().parse_args(["stop_app", "web", "--all", "--wait"])
    assert args.op == "stop_app" and args.all and args.wait
    args = parser().parse_args(["destroy-app", "web", "--force"])
    assert args.op == "destroy_app" and args.force
    args = parser().parse_args(["logs", "web", "-n", "5", "-f"])
    assert (args.lines, args.follow) == (5, True)
