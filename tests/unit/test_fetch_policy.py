"""The deploy fetch policy's rules, without a network: which addresses, spellings, URLs and local paths
a deploy may fetch from."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from nap_orch.config import Settings
from nap_orch.errors import BadRequest
from nap_orch.ops.fetch import check_url
from nap_orch.ops.fetch.common import credentials_refusal
from nap_orch.ops.fetch.local import local_source
from nap_orch.ops.fetch.policy import Refused, permitted, refusal, spelling_refusal

LOOPBACK = (ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%2", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "special-purpose"),  # Teredo
        # IPv6 forms that carry a refused IPv4 address
        ("::ffff:127.0.0.1", "loopback address (127.0.0.1) written as IPv6"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:0:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"),
        ("::a9fe:a9fe", "link-local"),
        ("64:ff9b::10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, why):
    found = refusal(address)
    assert found is not None and why in found


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "100.128.0.1",
    ],
)
def test_public_addresses_are_permitted(address):
    assert refusal(address) is None


def test_the_allow_list_lets_its_ranges_through_in_every_form():
    assert refusal("127.0.0.1", LOOPBACK) is None
    assert refusal("::ffff:127.0.0.1", LOOPBACK) is None
    assert refusal("::1", LOOPBACK) is not None  # IPv6 loopback is not 127.0.0.0/8
    narrow = (ip_network("127.0.0.1/32"),)
    assert refusal("127.0.0.1", narrow) is None
    assert "loopback" in refusal("127.0.0.2", narrow)
    assert refusal("10.0.0.5", (ip_network("10.0.0.0/24"),)) is None
    assert refusal("10.0.1.5", (ip_network("10.0.0.0/24"),)) is not None


@pytest.mark.parametrize(
    "host",
    ["0x7f000001", "0X7F000001", "2130706433", "0177.0.0.1", "127.1", "0x7f.0.0.1", "127.0.0.01", "1.2.3", "a.0x1"],
)
def test_odd_spellings_of_addresses_are_refused(host):
    assert "not written as a.b.c.d" in spelling_refusal(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "example.org", "::1", "fe80::1%eth0", "1.example", "x0.org", "a1"])
def test_names_and_canonical_addresses_pass_the_spelling_rule(host):
    assert spelling_refusal(host) is None


def test_a_name_keeps_only_its_permitted_addresses():
    assert permitted("h", ["10.0.0.1", "8.8.8.8", "127.0.0.1"], ()) == ["8.8.8.8"]
    assert permitted("h", ["10.0.0.1", "127.0.0.1"], LOOPBACK) == ["127.0.0.1"]
    with pytest.raises(Refused, match=r"refuses h \(10.0.0.1\): a private address \(RFC 1918\); NAP_FETCH_ALLOW"):
        permitted("h", ["10.0.0.1", "127.0.0.1"], ())


def test_the_allow_setting_is_parsed_and_checked_at_start():
    settings = Settings(fetch_allow="127.0.0.1/8, 10.0.0.5 ,::1")
    assert [str(n) for n in settings.fetch_allow_networks] == ["127.0.0.0/8", "10.0.0.5/32", "::1/128"]
    assert Settings.from_env({"NAP_FETCH_ALLOW": "192.168.0.0/16"}).fetch_allow_networks == (
        ip_network("192.168.0.0/16"),
    )
    with pytest.raises(ValueError, match="NAP_FETCH_ALLOW"):
        Settings(fetch_allow="10.0.0.0/8,nonsense")


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:s3cret@example.org/app.tgz",
        "https://token@example.org/app.tgz",
        "git+https://u:p@example.org/app.git",
        "http://@example.org/app.tgz",
        "file://u:p@localhost/srv/app",
    ],
)
def test_urls_with_credentials_are_refused_without_quoting_them(url):
    assert "credentials" in credentials_refusal(url)
    with pytest.raises(BadRequest) as caught:
        check_url(url, Settings(allow_local_sources=True))
    assert "credentials" in caught.value.message
    assert "s3cret" not in caught.value.message and "u:p" not in caught.value.message


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://0x7f000001/app.tgz", "not written as a.b.c.d"),
        ("http://2130706433:8080/app.tgz", "not written as a.b.c.d"),
        ("git://0177.0.0.1/app.git", "not written as a.b.c.d"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "link-local"),
        ("https://10.0.0.1/app.tgz", "private"),
        ("git+https://127.0.0.1/app.git", "loopback"),
        ("http://[fd00::1]:80/app.tgz", "unique-local"),
    ],
)
def test_urls_naming_refused_addresses_are_refused_at_submit(url, message):
    with pytest.raises(BadRequest, match=message):
        check_url(url, Settings())


def test_urls_naming_allowed_or_public_hosts_pass():
    check_url("http://127.0.0.1:8080/app.tgz", Settings(fetch_allow="127.0.0.0/8"))
    check_url("https://93.184.216.34/app.tgz", Settings())
    check_url("https://example.org/app.tgz", Settings())  # a name: checked when it is resolved


def local(tmp_path, **overrides) -> Settings:
    allowed = tmp_path / "sources"
    allowed.mkdir(exist_ok=True)
    return Settings(
        **{"home": tmp_path / "home", "allow_local_sources": True, "local_sources_dir": str(allowed), **overrides}
    )


def test_local_sources_inside_the_allowed_folder_pass(tmp_path):
    settings = local(tmp_path)
    (tmp_path / "sources" / "app").mkdir()
    assert local_source(str(tmp_path / "sources" / "app"), settings) == (tmp_path / "sources" / "app").resolve()
    check_url((tmp_path / "sources" / "app").as_uri(), settings)


def test_local_sources_outside_the_allowed_folder_are_refused(tmp_path):
    settings = local(tmp_path)
    (tmp_path / "sources" / "up").symlink_to("../elsewhere")
    for path in ("/etc", str(tmp_path / "sources" / ".." / "elsewhere"), str(tmp_path / "sources" / "up")):
        with pytest.raises(BadRequest, match="is outside .* where local sources may be"):
            check_url(path, settings)
    for path in (str(tmp_path), "/"):  # they hold NAP_HOME
        with pytest.raises(BadRequest, match="NAP_HOME"):
            check_url(path, settings)


def test_local_sources_reaching_nap_home_are_refused_through_links_too(tmp_path):
    settings = local(tmp_path, local_sources_dir=str(tmp_path))  # NAP_HOME inside the allowed folder
    (tmp_path / "home" / "apps" / "bob").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "home" / "apps" / "bob")
    for path in (tmp_path / "home", tmp_path / "home" / "admin.token", tmp_path / "link", tmp_path):
        with pytest.raises(BadRequest, match=r"reaches into the platform's folder \(NAP_HOME\)"):
            check_url(str(path), settings)
    with pytest.raises(BadRequest, match="NAP_HOME"):
        check_url((tmp_path / "link").as_uri(), settings)


def test_local_sources_without_a_folder_for_them_are_all_refused(tmp_path):
    settings = Settings(home=tmp_path / "home", allow_local_sources=True)
    with pytest.raises(BadRequest, match="no folder is set for them \\(NAP_LOCAL_SOURCES_DIR\\)"):
        check_url(str(tmp_path), settings)
