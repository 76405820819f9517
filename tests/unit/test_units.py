"""Units: rendered for systemd (checked by ``systemd-analyze verify``), parsed back exactly."""

import shutil
import sys

import pytest

from nap_orch import units
from nap_orch.units import HOST_REF, PORT_REF, Unit, expand, parse, ref, render, verify

NASTY = [
    "a b",
    "$(touch /tmp/pwned)",
    "`id`",
    "; rm -rf ~",
    "&& reboot",
    "%n",
    "%%i",
    "50%",
    'q"uote',
    "'single'",
    "back\\slash",
    "\\",
    '\\"',
    "ends with backslash\\",
    "${PORT}",
    "$PORT",
    "$$",
    "$",
    "x$",
    "",
    " ",
    "  padded  ",
    "tab\\t-not-a-tab",
    ";",
    "é€😀",
    "--flag=value with spaces",
    "#not a comment",
]


def make(**overrides) -> Unit:
    fields = {
        "name": "alice_web_common@3",
        "description": "nap instance alice_web 3",
        "argv": [sys.executable, "app.py", "--port=" + PORT_REF],
        "workdir": "/tmp",
        "env": {"PORT": "20003", "NAP_INSTANCE": "3"},
    }
    fields.update(overrides)
    return Unit(**fields)


def test_round_trip_keeps_nasty_values():
    unit = make(
        argv=[sys.executable, "-c", "pass", *NASTY, f"{HOST_REF}:{PORT_REF}", "$" + PORT_REF],
        env={"PORT": "20003", **{f"V{i}": v for i, v in enumerate(NASTY)}},
        description='50% of "nap" for alice\'s $app',
        workdir="/tmp/dir with spaces/%n",
        memory_max=200 * 1024 * 1024,
        restart_sec=0.2,
        restart_max_delay=4.5,
        restart_limit=3,
        stop_timeout=1.5,
    )
    text = render(unit)
    assert parse(text) == unit
    assert render(parse(text)) == text


def test_rendered_unit_passes_systemd_analyze_verify():
    unit = make(argv=[sys.executable, "-c", "pass", *NASTY, "--port=" + PORT_REF], memory_max=64 << 20)
    assert verify(render(unit), unit.name) == ""


@pytest.mark.parametrize("name", ["alice_web_common@3", "alice_web_mpi_master@2", "alice_web_mpi_slave@2-1"])
def test_instance_names_pass_verify(name):
    unit = make(name=name)
    assert verify(render(unit), name) == ""


def test_verify_reports_what_systemd_rejects():
    text = (
        render(make()).replace("Restart=on-failure", "Restart=sometimes").replace(sys.executable, "/nonexistent/python")
    )
    out = verify(text, "alice_web_common@3")
    assert "Restart" in out or "sometimes" in out
    assert "/nonexistent/python" in out


def test_exec_start_quotes_each_word_for_systemd():
    text = render(make(argv=["/bin/echo", "a b", "$(x)", "%n", 'q"', "b\\", "--port=" + PORT_REF]))
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert line == r'ExecStart="/bin/echo" "a b" "$$(x)" "%%n" "q\"" "b\\" "--port=${PORT}"'


def test_environment_lines_quote_without_doubling_dollars():
    text = render(make(env={"PORT": "1", "A": 'x$y %n "q" \\'}))
    assert 'Environment="PORT=1"' in text
    assert r'Environment="A=x$y %%n \"q\" \\"' in text


def test_expand_resolves_references_inside_words_only():
    unit = parse(render(make(argv=["/bin/echo", "--port=" + PORT_REF, HOST_REF, "${PORT}", "$$", "a b"])))
    env = {"PORT": "20003", "NAP_HOST": "10.0.0.7"}
    assert expand(unit.argv, env) == ["/bin/echo", "--port=20003", "10.0.0.7", "${PORT}", "$$", "a b"]
    assert expand([PORT_REF], {}) == [""]  # an unset variable expands to nothing, as in systemd


def test_other_references_need_listing_in_vars():
    with pytest.raises(ValueError, match="MASTER"):
        render(make(argv=["/bin/echo", ref("MASTER")]))
    unit = make(argv=["/bin/echo", ref("MASTER") + ":" + PORT_REF], vars=("MASTER",))
    text = render(unit)
    assert '"${MASTER}:${PORT}"' in text
    assert parse(text) == unit


@pytest.mark.parametrize(
    "bad", ["new\nline", "carriage\rreturn", "nul\x00", "bell\x07", "del\x7f", "c1\x85", "ls\u2028"]
)
def test_control_characters_are_refused_everywhere(bad):
    with pytest.raises(ValueError):
        render(make(argv=["/bin/echo", bad]))
    with pytest.raises(ValueError):
        render(make(env={"PORT": "1", "X": bad}))
    with pytest.raises(ValueError):
        render(make(description=bad))
    with pytest.raises(ValueError):
        render(make(workdir="/tmp/" + bad))


def test_a_forged_marker_is_refused():
    with pytest.raises(ValueError):
        render(make(argv=["/bin/echo", "\x00PORT"]))  # unbalanced: only the platform writes markers


@pytest.mark.parametrize("key", ["1X", "A-B", "A B", "A=B", ""])
def test_bad_environment_names_are_refused(key):
    with pytest.raises(ValueError):
        render(make(env={key: "v"}))


def test_command_is_resolved_to_an_absolute_executable(tmp_path):
    unit = make(argv=["sh", "-c", "true"])
    assert parse(render(unit)).argv[0] == units.resolve_executable("sh", unit.workdir)
    script = tmp_path / "bin" / "run"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    unit = parse(render(make(argv=["bin/run"], workdir=str(tmp_path))))
    assert unit.argv[0] == str(script)
    with pytest.raises(ValueError, match="not found"):
        render(make(argv=["no-such-command-anywhere"]))
    (tmp_path / "data").write_text("x")
    with pytest.raises(ValueError, match="not an executable"):
        render(make(argv=["./data"], workdir=str(tmp_path)))


def test_restart_fields_map_to_systemd_keys():
    text = render(make(restart_sec=0.2, restart_max_delay=30, restart_limit=5, stop_timeout=10, memory_max=256 << 20))
    for line in [
        "RestartSec=0.2",
        "X-RestartMaxDelaySec=30",
        "TimeoutStopSec=10",
        "Restart=on-failure",
        f"MemoryMax={256 << 20}",
        "StartLimitBurst=6",
        "WantedBy=multi-user.target",
    ]:
        assert line in text.splitlines()
    unit = make(restart_sec=0.2, restart_max_delay=1.0)
    assert [unit.restart_delay(i) for i in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]


def test_parse_reads_systemd_spellings():
    text = (
        render(make())
        .replace("RestartSec=1", "RestartSec=1min 500ms")
        .replace("TimeoutStopSec=10", "TimeoutStopSec=infinity")
    )
    text = text.replace("[Service]\n", "[Service]\nMemoryMax=512M\n")
    unit = parse(text)
    assert unit.restart_sec == 60.5
    assert unit.stop_timeout == float("inf")
    assert unit.memory_max == 512 * 1024 * 1024


def test_parse_refuses_what_it_cannot_run_exactly():
    base = render(make())
    with pytest.raises(ValueError, match="specifier"):
        parse(base.replace('"--port=${PORT}"', '"%i"'))
    with pytest.raises(ValueError, match="quoting"):
        parse(base.replace('"--port=${PORT}"', '"open'))
    with pytest.raises(ValueError, match="ExecStart"):
        parse("[Unit]\nDescription=x\n[Service]\nRestart=no\n")


def test_a_bare_command_is_found_on_the_instance_path_not_the_control_planes(tmp_path):
    # the app's own virtualenv first, then the host's system folders; never nap's interpreter
    assert units.resolve_executable("python3", str(tmp_path)) == shutil.which("python3", path=units.SYSTEM_PATH)
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").write_text("#!/bin/sh\n")
    (venv / "python3").chmod(0o755)
    assert units.resolve_executable("python3", str(tmp_path)) == str(venv / "python3")
    assert units.instance_path(str(tmp_path)).split(":")[:3] == [
        f"{tmp_path}/.venv/bin",
        f"{tmp_path}/venv/bin",
        f"{tmp_path}/bin",
    ]
    with pytest.raises(ValueError, match="not found on the instance's PATH"):
        units.resolve_executable("no-such-program-here", str(tmp_path))
