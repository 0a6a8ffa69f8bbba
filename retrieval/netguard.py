"""Which network addresses a download may connect to (no SSRF from an untrusted CSV).

A CSV of URLs can come from anywhere; fetching it must not turn this machine into a proxy into its own
network. By default a download may only connect to *global* unicast addresses. Refused (reason
``blocked-address``):

    loopback        127.0.0.0/8, ::1 (and every spelling: ``127.1``, ``2130706433``, ``0x7f.1``,
                    ``017700000001``, ``[::1]``, ``localhost``, ``[::ffff:127.0.0.1]``)
    private         10/8, 172.16/12, 192.168/16, fc00::/7, 100.64/10 (carrier-grade NAT)
    link-local      169.254/16 (cloud metadata at 169.254.169.254), fe80::/10
    multicast       224/4, ff00::/8
    unspecified     0.0.0.0/8, :: (connecting to 0.0.0.0 reaches this machine on Linux)
    reserved        240/4, 255.255.255.255, documentation and benchmark ranges, and anything else
                    that ``ipaddress`` does not call global

IPv6 addresses that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``,
NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) are judged by the IPv4 address inside as well.

The rules are applied to the addresses a connection will *actually* use, after name resolution, and the
socket is connected to the address that was checked (no second lookup, so DNS rebinding cannot swap it);
``retrieval.fetch`` does this for every connection, so every redirect hop is checked too. A host name that
is itself an address literal (in any spelling) or a ``localhost`` name is also refused before any
connection, which is what protects URLs sent through a user-configured proxy (the proxy resolves names,
so only literals can be judged here; the proxy itself is the user's choice and is not checked).

Private addresses are allowed when ``DINOV2_ALLOW_PRIVATE=1`` is in the environment, or with the CLI flag
``--allow-private`` (users on a LAN, and the test suite's loopback servers).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket

__all__ = ["ALLOW_ENV", "allow_private_default", "address_problem", "host_problem", "parse_ipv4_legacy",
           "resolve_checked", "BlockedAddressError"]

ALLOW_ENV = "DINOV2_ALLOW_PRIVATE"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_LOCALHOST_NAMES = re.compile(r"^(localhost|localhost\.localdomain|ip6-localhost|ip6-loopback)$|\.localhost$")


class BlockedAddressError(OSError):
    """A connection refused by the address rules. ``reason`` is the one-line reason (``blocked-address: ...``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def allow_private_default() -> bool:
    """Whether the environment allows private addresses (``DINOV2_ALLOW_PRIVATE=1``, ``true``, ``yes``)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _kind(ip) -> str | None:
    """Why one address (no embedded address considered) may not be contacted, or None when it is global."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.version == 4 and ip in _CGNAT:
        return "private"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def address_problem(ip) -> str | None:
    """Why ``ip`` (an ``ipaddress`` address or a string in standard notation) may not be contacted:
    ``"loopback"``, ``"private"``, ``"link-local"``, ``"multicast"``, ``"unspecified"``, ``"reserved"``;
    None for a global unicast address. A pure function: nothing is resolved or contacted."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if ip.version == 6:
        inner = ip.ipv4_mapped
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is None and ip.sixtofour is not None:
            inner = ip.sixtofour
        if inner is None and ip.teredo is not None:
            inner = ip.teredo[1]  # the client's address
        if inner is None and int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            problem = _kind(inner)
            if problem is not None:
                return problem
            if ip.ipv4_mapped is not None or ip in _NAT64:
                return None  # the IPv4 address it stands for is global
        if ip in _NAT64_LOCAL:
            return "private"
    return _kind(ip)


def parse_ipv4_legacy(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host name spells in the forms ``inet_aton`` (and so the C resolver) accepts:
    1 to 4 parts, each decimal, ``0x`` hex or ``0`` octal (``127.1``, ``2130706433``, ``0x7f.1``,
    ``017700000001``); a trailing dot is allowed. None when it is not such a literal."""
    h = host.strip().rstrip(".")
    if not h:
        return None
    parts = h.split(".")
    if len(parts) > 4:
        return None
    values = []
    for p in parts:
        if not p:
            return None
        try:
            if p[:2].lower() == "0x":
                v = int(p[2:], 16) if len(p) > 2 else 0
            elif len(p) > 1 and p[0] == "0":
                v = int(p[1:], 8)
            else:
                if not p.isdigit():
                    return None
                v = int(p, 10)
        except ValueError:
            return None
        values.append(v)
    # the last part fills the remaining bytes
    head, last = values[:-1], values[-1]
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    n = 0
    for v in head:
        n = n * 256 + v
    n = n * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(n)


def literal_address(host: str):
    """The address a URL's host names without any lookup (an IP literal in any spelling), or None."""
    h = host.strip().strip("[]")
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            return None
    return parse_ipv4_legacy(h)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _hint() -> str:
    return f"set {ALLOW_ENV}=1 or pass --allow-private to allow it"


def host_problem(host: str) -> str | None:
    """The ``blocked-address: ...`` reason for a URL host that is an address literal (any spelling) or a
    localhost name that may not be contacted; None otherwise (a name is judged after resolution)."""
    h = (host or "").strip().strip("[]").rstrip(".").lower()
    if _LOCALHOST_NAMES.search(h):
        return f"blocked-address: {host} is a loopback name ({_hint()})"
    ip = literal_address(h)
    if ip is None:
        return None
    problem = address_problem(ip)
    if problem is None:
        return None
    shown = str(ip) if str(ip) == h else f"{host} ({ip})"
    return f"blocked-address: {shown} is {_a(problem)} address ({_hint()})"


def resolve_checked(host: str, port: int, family=socket.AF_UNSPEC) -> list[tuple]:
    """``getaddrinfo`` results for ``host`` whose addresses may be contacted (in the resolver's order).

    Raises :class:`BlockedAddressError` when the name resolves only to refused addresses; lets
    ``socket.gaierror`` through (no such host). A mixed answer keeps only the permitted addresses.
    """
    h = host.strip("[]")
    problem = host_problem(h)
    if problem is not None:
        raise BlockedAddressError(problem)
    infos = socket.getaddrinfo(h, port, family, socket.SOCK_STREAM)
    allowed, refused = [], []
    for info in infos:
        addr = info[4][0]
        kind = address_problem(addr)
        (refused if kind else allowed).append((info, kind))
    if not allowed and refused:
        addr, kind = refused[0][0][4][0], refused[0][1]
        shown = addr if addr == h else f"{host} -> {addr}"
        raise BlockedAddressError(f"blocked-address: {shown} is {_a(kind)} address ({_hint()})")
    return [info for info, _ in allowed]
