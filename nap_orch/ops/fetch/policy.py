"""The deploy fetch policy: which addresses a deploy may fetch from.

A deploy URL is a tenant's, and the worker that fetches it sits inside the platform's network. Without
a policy a tenant could have it fetch from loopback (the API, Redis, etcd), the cloud's metadata
service (169.254.169.254) or the private network, and read what came back in the job's messages. So
every connection a fetch makes is checked on the address it actually connects to, after name
resolution and on every redirect, and it connects to that checked address and no other (a second
lookup could answer differently: DNS rebinding):

- http(s) archives (aiohttp): :class:`PolicyResolver` resolves a name with aiohttp's default resolver
  and hands on only the permitted addresses, which aiohttp then connects to; :func:`guarded_socket`
  (aiohttp's socket factory) refuses to make a socket for any other address, an IP literal in the URL
  included. Redirects are followed by hand (``http.py``), each hop checked as the first URL was.
- git over http(s): the name is resolved and checked here (:func:`resolve`), then git (libcurl) is
  pinned to those addresses with ``http.curloptResolve`` and follows no redirect (``git.py``). Over
  ``git://`` git resolves names itself, so the clone goes to the checked address, written in the URL.

Refused unless ``NAP_FETCH_ALLOW`` (comma-separated CIDRs, ``Settings.fetch_allow``) lists them:
the addresses in :data:`REFUSED` (unspecified, loopback, RFC 1918, CGNAT, link-local, unique-local,
multicast, broadcast, reserved and documentation ranges), and IPv6 addresses that carry one of them
(IPv4-mapped, -compatible, NAT64 and 6to4 forms). Host names that the C library would read as an IPv4
address though they are not written ``a.b.c.d`` (``0x7f000001``, ``2130706433``, ``0177.0.0.1``,
``127.1``) are refused whatever the allow list says: they serve only to slip past checks.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

ALLOW_HINT = "NAP_FETCH_ALLOW lists the exceptions"

REFUSED: tuple[tuple[Network, str], ...] = tuple(
    (ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("10.0.0.0/8", "a private address (RFC 1918)"),
        ("100.64.0.0/10", "a shared address (CGNAT)"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address (RFC 1918)"),
        ("192.0.0.0/24", "a special-purpose address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.168.0.0/16", "a private address (RFC 1918)"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved or broadcast address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard address"),
        ("2001::/23", "a special-purpose address"),  # Teredo (2001::/32) among them
        ("2001:db8::/32", "a documentation address"),
        ("fc00::/7", "a unique-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)

# IPv6 forms that carry an IPv4 address in their last 32 bits: judged by that IPv4 address.
_COMPATIBLE = ip_network("::/96")  # IPv4-compatible (deprecated), :: and ::1 apart
_SIIT = ip_network("::ffff:0:0:0/96")  # IPv4-translated
_NAT64 = ip_network("64:ff9b::/96")


class Refused(OSError):
    """A destination the fetch policy refuses; its message says which and why.

    An ``OSError``, so that aiohttp reports it as the connection's failure (``ClientConnectorError``
    with this as its ``os_error``) and tries no other way."""


def embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if (ip in _COMPATIBLE and int(ip) > 1) or ip in _SIIT or ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(address: str | Address, allow: Iterable[Network] = ()) -> str | None:
    """Why the policy refuses to connect to ``address`` (as "a loopback address"), or None."""
    ip = ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    allow = tuple(allow)
    if any(ip in net for net in allow):
        return None
    if isinstance(ip, IPv6Address) and (v4 := embedded_ipv4(ip)) is not None:
        why = refusal(v4, allow)
        return f"{why} ({v4}) written as IPv6" if why else None
    for net, why in REFUSED:
        if ip in net:
            return why
    return None


def check_address(address: str, allow: Iterable[Network], host: str | None = None) -> None:
    """Raise :class:`Refused` unless ``address`` (what ``host`` resolved to) may be connected to."""
    why = refusal(address, allow)
    if why is not None:
        raise refused(address, why, host)


def refused(address: str, why: str, host: str | None = None) -> Refused:
    named = f"{host} ({address})" if host and host != address else address
    return Refused(f"the fetch policy refuses {named}: {why}; {ALLOW_HINT}")


_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.IGNORECASE)


def spelling_refusal(host: str) -> str | None:
    """Why ``host`` is refused as written, or None: a name whose last label is a number (``0x7f000001``,
    ``2130706433``, ``0177.0.0.1``, ``127.1``) is an IPv4 address to the C library, but not one
    written ``a.b.c.d``, and has no business in a deploy URL (as the WHATWG URL standard reads it)."""
    try:
        ip_address(host.split("%", 1)[0])
        return None  # a canonical IPv4 or an IPv6 address: judged by its address
    except ValueError:
        pass
    last = host.rstrip(".").rpartition(".")[2]
    if _NUMERIC_LABEL.fullmatch(last):
        return f"the host {host[:80]!r} is an IP address not written as a.b.c.d"
    return None


def permitted(host: str, addresses: Iterable[str], allow: Iterable[Network]) -> list[str]:
    """The addresses of ``host`` the policy permits, in order; :class:`Refused` if none is."""
    allow = tuple(allow)
    addresses = list(dict.fromkeys(addresses))
    kept = [a for a in addresses if refusal(a, allow) is None]
    if kept:
        return kept
    if not addresses:
        raise Refused(f"{host} has no address")
    first = addresses[0]
    raise refused(first, refusal(first, allow) or "", host)


async def resolve(host: str, port: int, allow: Iterable[Network]) -> list[str]:
    """Resolve ``host`` and return its permitted addresses (for git, which is then pinned to them).

    :raises Refused: it has none the policy permits.
    :raises OSError: it does not resolve (``socket.gaierror``).
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return permitted(host, (str(info[4][0]) for info in infos), allow)


class PolicyResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only the addresses the policy permits: aiohttp connects to
    what this returns, so the address checked is the address connected to."""

    def __init__(self, allow: Iterable[Network]):
        self.allow = tuple(allow)
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        kept = set(permitted(host, (r["host"] for r in results), self.allow))
        return [r for r in results if r["host"] in kept]

    async def close(self) -> None:
        await self.inner.close()


def guarded_socket(allow: Iterable[Network]) -> Callable[[tuple], socket.socket]:
    """aiohttp's ``socket_factory``: a socket for an address the policy permits, else :class:`Refused`.
    Every connection aiohttp opens passes here with the address it is about to connect to, the IP
    literals that aiohttp does not hand to the resolver included."""
    allow = tuple(allow)

    def make(addr_info: tuple) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        check_address(str(sockaddr[0]), allow)
        return socket.socket(family, kind, proto)

    return make
