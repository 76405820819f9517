"""The web manager in a real browser (Playwright driving Debian's chromium, headless) against the real
stack: sign in, deploy, launch, follow instances and journals live, MPI runs grouped as a master and
its slaves, cancel a queued and a running job, tenants kept apart, user strings shown as text, the
Content-Security-Policy, and a 390 px wide layout.

NAP_SCREENSHOTS=docs saves the main pages as PNG files there (for the README)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from nap_orch.cli.client import ApiError
from tests.support.apps import SERVER_PY, WEB_PROFILE, write_app
from tests.support.fixtures import LIMITS
from tests.support.flows import deploy, publish
from tests.support.stack import NapStack

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "<script>alert(1)</script>"
# The test app's server says so in its journal each time it answers a request.
LOGGING_SERVER = SERVER_PY.replace("c.close()", "print('served a request', flush=True); c.close()")
SCREENSHOTS = os.environ.get("NAP_SCREENSHOTS")
TIMEOUT = 120_000  # ms, for what waits on a job or an instance (a launch waits as long for its instances)
# expect()'s own default is 5 s, not the context's: as long, since an expectation may wait on a job too
expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def tenant(stack, file_server, tmp_path_factory):
    """A user with the app ``web`` deployed (through the API): (name, client)."""
    name, client = stack.add_user()
    src = write_app(tmp_path_factory.mktemp("web-src"), {"profile": WEB_PROFILE, "server.py": LOGGING_SERVER})
    assert deploy(stack, client, "web", publish(file_server, src, "tgz"))["state"] == "succeeded"
    yield name, client
    stack.remove_instances([name])


@pytest.fixture
def page(browser):
    """A fresh browser context (nothing kept from another test), whose dialogs are recorded: a page
    that runs an injected alert() shows one."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT)
    p = context.new_page()
    p.dialogs = []
    p.on("dialog", lambda d: (p.dialogs.append(d.message), d.dismiss()))
    yield p
    context.close()


def launched(stack, client) -> None:
    """What the launch test does, through the API, for a test that runs without it."""
    if client.get("/v1/apps/web/instances")["count"] == 0:
        job = client.post("/v1/apps/web/instances", {"params": {"name": XSS_IMG, "greeting": XSS_SCRIPT}, "count": 1})
        assert stack.wait_job(client, job["job"])["state"] == "succeeded"


def sign_in(page, stack, token: str, who: str) -> None:
    page.goto(stack.url + "/")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text(f"signed in as {who}")


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"web-{name}.png"), full_page=True)


def test_sign_in_keeps_the_token_out_of_urls_and_sign_out_forgets_it(page, stack, tenant):
    name, client = tenant
    page.goto(stack.url + "/")
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not known")

    sign_in(page, stack, client.token, name)
    expect(page.locator("#apps")).to_contain_text("web")
    assert client.token not in page.url
    assert page.evaluate("sessionStorage.getItem('nap_token')") == client.token

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Token")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('nap_token')") is None


def test_deploy_from_an_http_url_follows_the_job_and_lands_on_the_app(page, stack, file_server, tmp_path):
    name, client = stack.add_user()
    url = publish(file_server, write_app(tmp_path / "src", {"profile": WEB_PROFILE, "server.py": SERVER_PY}), "tgz")
    sign_in(page, stack, client.token, name)
    page.get_by_label("Name").fill("site")
    page.get_by_label("URL").fill(url)
    page.get_by_role("button", name="Deploy").click()

    page.wait_for_url("**/#/apps/site", timeout=TIMEOUT)
    expect(page.get_by_role("heading", name="site", exact=True)).to_be_visible()
    job = page.locator(".job-panel")
    expect(job.locator(".state")).to_have_text("succeeded")
    expect(job.locator(".log div").first).to_be_visible()  # the job's log lines, as they came
    assert job.locator("progress").evaluate("p => p.value === p.max")
    expect(page.locator("#app-profile")).to_contain_text("python3 server.py")


def test_launch_with_parameters_shows_instances_running_live_as_text(page, stack, tenant):
    name, client = tenant
    sign_in(page, stack, client.token, name)
    page.goto(f"{stack.url}/#/apps/web")
    expect(page.locator("#instances")).to_be_visible()
    page.get_by_label("name", exact=True).fill(XSS_IMG)
    page.get_by_label("greeting").fill(XSS_SCRIPT)
    page.get_by_label("Count").fill("3")
    page.get_by_role("button", name="Launch").click()

    # No reload: the table follows the instances as they start.
    rows = page.locator("#instances tbody tr")
    expect(rows).to_have_count(3)
    for n in (1, 2, 3):
        expect(page.locator(f'#instances tr[data-name="{name}_web_common@{n}"] .st')).to_have_text("running")
    expect(page.locator(".job-panel .state")).to_have_text("succeeded")  # the job publishes the ports last
    # the launch's progress counts its instances (not its two phases' doubled count)
    expect(page.locator(".job-panel .progress-text")).to_have_text("3 of 3 settled")
    # the app's logs: every instance's journal merged, each line marked with its instance
    page.get_by_role("button", name="Show logs").click()
    expect(page.locator("#app-logs")).to_contain_text(f"{name}_web_common@3")
    expect(page.locator("#instances thead")).to_contain_text("Host / node")
    for n in (1, 2, 3):
        port = client.get(f"/v1/instances/{name}_web_common@{n}/port")
        link = page.locator(f'#instances tr[data-name="{name}_web_common@{n}"] a.port')
        expect(link).to_have_attribute("href", f"http://{port['host']}:{port['port']}")
        # the host (the Slurm engine's node) as the API reports it
        host = client.get(f"/v1/instances/{name}_web_common@{n}")["host"]
        expect(page.locator(f'#instances tr[data-name="{name}_web_common@{n}"] .hs')).to_have_text(host)
    shot(page, "app")

    page.get_by_role("button", name=f"Stop {name}_web_common@2").click()
    expect(page.locator(f'#instances tr[data-name="{name}_web_common@2"] .st')).to_have_text("stopped")
    assert client.get(f"/v1/instances/{name}_web_common@2")["state"] == "stopped"
    assert page.dialogs == []


def test_an_instance_page_follows_its_journal_and_shows_markup_as_text(page, stack, tenant):
    name, client = tenant
    inst = f"{name}_web_common@1"
    launched(stack, client)
    sign_in(page, stack, client.token, name)
    page.goto(f"{stack.url}/#/instances/{urllib.parse.quote(inst)}")
    journal = page.locator("#journal")
    expect(journal).to_contain_text(XSS_SCRIPT)  # the server prints its arguments
    expect(page.locator("#instance-profile")).to_contain_text(XSS_IMG)
    expect(page.locator("#unit")).not_to_be_empty()
    port = client.get(f"/v1/instances/{inst}/port")
    expect(page.locator("#instance-port a")).to_have_attribute("href", f"http://{port['host']}:{port['port']}")
    assert page.locator("main img, main script").count() == 0

    before = journal.inner_text().count("served a request")
    with socket.create_connection((port["host"], port["port"]), timeout=30) as s:
        assert s.recv(100).startswith(b"hello from")
    page.wait_for_function(
        "n => document.querySelector('#journal').textContent.split('served a request').length - 1 > n", arg=before
    )
    shot(page, "instance")

    page.get_by_role("button", name="Pause").click()
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    page.get_by_label("Show").select_option("10")
    expect(journal).to_contain_text("served a request")
    assert page.dialogs == []


def test_jobs_page_lists_the_users_jobs_and_a_job_page_its_events(page, stack, tenant):
    name, client = tenant
    sign_in(page, stack, client.token, name)
    page.goto(f"{stack.url}/#/jobs")
    expect(page.locator("#jobs tbody")).to_contain_text("deploy")
    shot(page, "jobs")
    page.locator("#jobs tbody td:first-child a").last.click()  # the oldest: the deploy
    expect(page.get_by_role("heading", name="Job")).to_be_visible()
    expect(page.locator(".job-panel .state")).to_have_text("succeeded")
    expect(page.locator(".job-panel .log div").first).to_be_visible()
    expect(page.locator("#cancel")).to_be_hidden()  # an ended job can't be cancelled


def test_another_user_finds_a_not_found_page_for_the_first_users_app(page, stack, tenant):
    name, _ = tenant
    other, client = stack.add_user()
    sign_in(page, stack, client.token, other)
    expect(page.locator("#apps")).not_to_contain_text("web")
    page.goto(f"{stack.url}/#/apps/web")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("Not found")
    page.goto(f"{stack.url}/#/instances/{urllib.parse.quote(name + '_web_common@1')}")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert "{" not in page.locator("main").inner_text()  # a message, not the raw JSON


def test_the_admin_adds_a_user_and_sees_its_token_once(page, stack):
    sign_in(page, stack, stack.admin_token, "admin")
    page.get_by_role("link", name="Admin").click()
    added = "w" + uuid.uuid4().hex[:8]
    page.locator("#user-name").fill(added)
    page.get_by_role("button", name="Add user").click()
    token = page.locator("#new-user code.token").inner_text()
    assert stack.client(token).get("/v1/whoami")["name"] == added
    # the users' list follows: the new user, no apps yet; the admin marked as one
    expect(page.locator(f'#users tr[data-user="{added}"]')).to_contain_text("none")
    expect(page.locator('#users tr[data-user="admin"]')).to_contain_text("admin")
    listed = {u["name"]: u for u in stack.client(stack.admin_token).get("/v1/users")["users"]}
    assert listed[added]["apps"] == [] and not listed[added]["admin"] and "token_sha256" not in listed[added]
    with pytest.raises(ApiError) as e:  # only an admin lists users
        stack.client(token).get("/v1/users")
    assert e.value.status == 403
    page.locator("#user-name").fill(added)
    page.get_by_role("button", name="Add user").click()  # again: the API's conflict, as a message
    expect(page.get_by_role("alert")).to_be_visible()
    assert "{" not in page.get_by_role("alert").inner_text()
    page.locator("#quota-name").fill(added)
    page.get_by_role("button", name="Show quota").click()
    expect(page.locator("#quota")).to_contain_text("instances")


def test_the_pages_have_a_csp_and_no_route_reads_files_outside_the_static_folder(stack):
    for path, ctype in (("/", "text/html"), ("/web/app.js", "text/javascript"), ("/web/style.css", "text/css")):
        with urllib.request.urlopen(stack.url + path, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith(ctype)
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    host, port = urllib.parse.urlsplit(stack.url).netloc.split(":")
    for raw in (
        "/web/../../pyproject.toml",
        "/web/%2e%2e/%2e%2e/pyproject.toml",
        "/web/..%2f..%2fpyproject.toml",
        "/web/static/app.js",
        "/web/nope.js",
        "/etc/passwd",
        "//etc/passwd",
        "/web//etc/passwd",
    ):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", raw)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 404, raw
        assert json.loads(body)["error"] == "not_found", raw


def test_the_390_px_layout_has_no_horizontal_scroll(browser, stack, tenant):
    name, client = tenant
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.set_default_timeout(TIMEOUT)
    page = context.new_page()
    launched(stack, client)
    try:
        sign_in(page, stack, client.token, name)
        # each page measured once its content is there (rows, journal lines), not after a fixed pause
        for where, ready in (
            ("#/apps", "#apps tbody tr"),
            ("#/apps/web", "#instances tbody tr"),
            (f"#/instances/{urllib.parse.quote(name + '_web_common@1')}", "#journal:not(:empty)"),
            ("#/jobs", "#jobs tbody tr"),
        ):
            page.goto(f"{stack.url}/{where}")
            expect(page.locator(ready).first).to_be_visible()
            width = page.evaluate("document.scrollingElement.scrollWidth")
            assert width <= 390, (where, width)
            if where == "#/apps/web":
                shot(page, "phone-app")
    finally:
        context.close()


def test_a_queued_job_is_cancelled_from_its_page(browser, tmp_path_factory, redis_server, etcd_server, file_server):
    # A stack of its own without a worker: its jobs stay queued until cancelled.
    stack = NapStack(
        tmp_path_factory.mktemp("nap-web-cancel"), redis_server.url, etcd_server.endpoint, extra_env=LIMITS
    )
    stack.start()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT)
    try:
        stack.kill("worker")
        name, client = stack.add_user()
        src = write_app(tmp_path_factory.mktemp("cancel-src"), {"profile": WEB_PROFILE, "server.py": SERVER_PY})
        job = client.post("/v1/apps", {"app": "late", "url": publish(file_server, src, "tgz")})["job"]
        page = context.new_page()
        sign_in(page, stack, client.token, name)
        page.goto(f"{stack.url}/#/jobs/{job}")
        expect(page.locator("main dl .state")).to_have_text("queued")
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("main dl .state")).to_have_text("cancelled")
        expect(page.locator("#cancel")).to_be_hidden()
        expect(page.locator(".job-panel .state")).to_have_text("cancelled")  # the event stream ends with it
        assert client.get(f"/v1/jobs/{job}")["state"] == "cancelled"
    finally:
        context.close()
        stack.stop()


def test_a_running_job_is_cancelled_from_its_page(page, stack, file_server):
    """A deploy whose download never ends (the file server holds its answer open, a byte at a time) runs
    until it is cancelled from its page; the page follows it from running to cancelled."""
    name, client = stack.add_user()
    url = file_server.hold()
    try:
        job = client.post("/v1/apps", {"app": "held", "url": url})["job"]
        sign_in(page, stack, client.token, name)
        page.goto(f"{stack.url}/#/jobs/{job}")
        expect(page.locator(".job-panel .log")).to_contain_text("downloading")  # it runs, and waits on the answer
        expect(page.locator("#job-state .state")).to_have_text("running")
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator(".job-panel .log")).to_contain_text("cancel requested")
        expect(page.locator("#job-state .state")).to_have_text("cancelled")
        expect(page.locator(".job-panel .state")).to_have_text("cancelled")
        expect(page.locator("#cancel")).to_be_hidden()
        got = client.get(f"/v1/jobs/{job}")
        assert got["state"] == "cancelled" and got["started"] is not None, got
        assert page.dialogs == []
    finally:
        file_server.release(url)


def test_mpi_runs_are_grouped_as_a_master_and_its_slaves(page, stack, file_server, tmp_path):
    """Two runs of an MPI app (one launched from the page): each run is its master's row (the run's number,
    and its state counted over its instances) with its slaves' rows under it, though the API lists every
    master before the slaves; a run is stopped whole from its master's row."""
    name, client = stack.add_user()
    src = write_app(tmp_path / "mpi", {"mpi.xml": "command: sleep {seconds}\nhosts: 2\n"})
    assert deploy(stack, client, "ranks", publish(file_server, src, "tgz"))["state"] == "succeeded"
    try:
        other = client.post("/v1/apps/ranks/mpi", {"params": {"seconds": "1000"}})["job"]
        sign_in(page, stack, client.token, name)
        page.goto(f"{stack.url}/#/apps/ranks")
        expect(page.get_by_role("heading", name="Start an MPI run")).to_be_visible()
        page.get_by_label("seconds").fill("1000")
        page.get_by_role("button", name="Launch").click()
        expect(page.locator(".job-panel .state")).to_have_text("succeeded")
        mine = page.locator(".job-panel").get_attribute("data-job")
        jobs = [client.get(f"/v1/jobs/{mine}"), stack.wait_job(client, other)]
        assert all(j["state"] == "succeeded" for j in jobs), jobs
        runs = sorted(j["result"]["run"] for j in jobs)
        master = {r: f"{name}_ranks_mpi_master@{r}" for r in runs}
        grouped = [n for r in runs for n in (master[r], *(f"{name}_ranks_mpi_slave@{r}-{i}" for i in (1, 2)))]
        listed = [r["name"] for r in client.get("/v1/apps/ranks/instances")["instances"]]
        assert listed != grouped and sorted(listed) == sorted(grouped)  # the API's order is not the page's

        rows = page.locator("#instances tbody tr")
        expect(rows).to_have_count(6)
        for n in grouped:
            expect(page.locator(f'#instances tr[data-name="{n}"] .st .state')).to_have_text("running")
        for r in runs:
            expect(page.locator(f'#instances tr[data-name="{master[r]}"] .run-state')).to_have_text("run: 3 running")
        assert rows.evaluate_all("trs => trs.map(tr => tr.dataset.name)") == grouped
        for r in runs:
            head = page.locator(f'#instances tr[data-name="{master[r]}"]')
            expect(head).to_have_class("run-master")
            expect(head.locator("td").first).to_contain_text(f"Run {r}")
            for i in (1, 2):
                slave = page.locator(f'#instances tr[data-name="{name}_ranks_mpi_slave@{r}-{i}"]')
                expect(slave).to_have_class("run-slave")
                expect(slave.locator("td").first).to_contain_text(f"slave {i}")
                expect(slave.locator("button")).to_have_count(0)  # a run stops and goes whole, from its master
        for row in client.get("/v1/apps/ranks/instances")["instances"]:
            expect(page.locator(f'#instances tr[data-name="{row["name"]}"] .hs')).to_have_text(row["host"])
        for never in ("Start all", "Restart all", "Scale"):  # a run is not started again, nor scaled
            expect(page.get_by_role("button", name=never, exact=True)).to_have_count(0)
        shot(page, "mpi")
        page.set_viewport_size({"width": 390, "height": 844})
        expect(rows.first).to_be_visible()
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
        page.set_viewport_size({"width": 1280, "height": 900})

        # a slave's page leads to its run's master
        page.locator(f'#instances tr[data-name="{name}_ranks_mpi_slave@{runs[1]}-2"] a').first.click()
        expect(page.locator("#instance-master")).to_have_text(f"run {runs[1]}: its master")
        page.locator("#instance-master").click()
        expect(page.get_by_role("heading", name=master[runs[1]])).to_be_visible()
        page.goto(f"{stack.url}/#/apps/ranks")
        expect(page.locator("#app-logs")).to_be_hidden()  # no empty box until asked for
        page.get_by_role("button", name="Show logs").click()
        expect(page.locator("#app-logs")).to_be_visible()

        page.get_by_role("button", name=f"Stop run {runs[0]}").click()
        expect(page.locator(f'#instances tr[data-name="{master[runs[0]]}"] .st .state')).to_have_text("stopped")
        expect(page.locator(f'#instances tr[data-name="{master[runs[0]]}"] .run-state')).not_to_contain_text("running")
        expect(page.locator(f'#instances tr[data-name="{master[runs[1]]}"] .run-state')).to_have_text("run: 3 running")
        assert page.dialogs == []
    finally:
        stack.remove_instances([name])
