"""No SSRF (issue 10): loopback, private, link-local, multicast, unspecified and reserved addresses are refused in
every spelling, after name resolution and on every redirect hop, unless DINOV2_ALLOW_PRIVATE=1 / --allow-private.

conftest.py sets DINOV2_ALLOW_PRIVATE=1 for the suite; these tests remove it. With it removed even the test server
(127.0.0.1) is refused, so the refusals are tested against it, and the "allowed public address" decision is
tested as a pure function (no public address may be contacted here). Where a test needs an address that the rules
allow, it replaces the rules by ones that treat exactly 127.0.0.1 as public, and reaches it under a made-up name.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading

import pytest

from retrieval import netguard
from retrieval.fetch import FetchConfig, Fetcher
from retrieval.ingest import is_transient
from test_ingest import ROOT, env, jpeg, rows_by_url, weights, write_csv  # noqa: F401

SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001", "017700000001", "0177.0.0.1", "127.0.0.1.",
             "localhost", "LocalHost.", "app.localhost", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
             "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "0.0.0.0", "0", "[::]"]
OTHER_BLOCKED = ["169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.0.10", "100.64.0.1", "224.0.0.251",
                 "239.255.255.250", "255.255.255.255", "240.0.0.1", "198.18.0.1", "192.0.2.1", "[fe80::1]",
                 "[fd00::1]", "[ff02::1]", "[::ffff:169.254.169.254]", "[::ffff:10.0.0.1]", "[64:ff9b::a9fe:a9fe]"]


@pytest.fixture
def no_allow(monkeypatch):
    monkeypatch.delenv("DINOV2_ALLOW_PRIVATE", raising=False)


def test_address_rules_as_pure_functions():
    for host in SPELLINGS + OTHER_BLOCKED:
        reason = netguard.host_problem(host.strip("[]"))
        assert reason and reason.startswith("blocked-address: "), host
        assert "DINOV2_ALLOW_PRIVATE=1" in reason and "--allow-private" in reason
    for host in ("127.1", "2130706433", "0x7f.1", "017700000001"):
        assert netguard.parse_ipv4_legacy(host) == ipaddress.IPv4Address("127.0.0.1"), host
    assert "loopback" in netguard.host_problem("127.1") and "link-local" in netguard.host_problem("169.254.169.254")
    assert "multicast" in netguard.host_problem("224.0.0.251") and "unspecified" in netguard.host_problem("0")
    assert "private" in netguard.host_problem("10.1.2.3")
    # public addresses, IPv4 and IPv6, and IPv4-mapped / NAT64 forms of a public address are allowed
    for ip in ("93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
               "::ffff:93.184.216.34", "64:ff9b::5db8:d822"):
        assert netguard.address_problem(ip) is None, ip
        assert netguard.host_problem(ip) is None, ip
    # names are judged after resolution, not by their text; things that are not addresses are not literals
    for name in ("example.com", "127.0.0.1.example.com", "localhost.example.com", "1.2.3.4.5", "0x7g.1", "08.1"):
        assert netguard.host_problem(name) is None, name


def test_allow_private_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DINOV2_ALLOW_PRIVATE", raising=False)
    assert not netguard.allow_private_default() and not Fetcher().allow_private
    monkeypatch.setenv("DINOV2_ALLOW_PRIVATE", "1")
    assert netguard.allow_private_default() and Fetcher().allow_private
    assert not Fetcher(FetchConfig(allow_private=False)).allow_private  # the explicit setting wins
    monkeypatch.setenv("DINOV2_ALLOW_PRIVATE", "0")
    assert Fetcher(FetchConfig(allow_private=True)).allow_private and not Fetcher().allow_private


def test_every_spelling_of_the_loopback_server_is_refused_without_a_request(http_server, no_allow):
    url = http_server.add("/cat.jpg", body=jpeg(1), headers={"Content-Type": "image/jpeg"})
    port = http_server.port
    with Fetcher(FetchConfig(deadline=5, retries=0)) as f:
        for host in SPELLINGS:
            r = f.fetch(f"http://{host}:{port}/cat.jpg")
            assert not r.ok and r.tag == "blocked-address" and not r.transient, (host, r)
            assert r.attempts == 1 and r.elapsed < 2, (host, r)
        for host in OTHER_BLOCKED:  # refused before any connection: nothing is sent to these addresses
            r = f.fetch(f"http://{host}/latest/meta-data/")
            assert not r.ok and r.tag == "blocked-address" and not r.transient, (host, r)
    assert http_server.count() == 0
    assert not is_transient(r.reason)
    # and the same server is fetched once private addresses are allowed
    with Fetcher(FetchConfig(allow_private=True)) as f:
        assert f.fetch(url).ok
    assert http_server.count() == 1


PUBLIC_NAMES = ("public.test", "rebind.test", "mixed.test")


@pytest.fixture
def fake_dns(monkeypatch):
    """Made-up names resolved to chosen addresses (all else: the real resolver). When a name of PUBLIC_NAMES is
    resolved, its answer 127.0.0.1 stands for a public address (the rules say so for that lookup only; every
    other spelling or name of 127.0.0.1 stays refused). Returns the {name: [addresses]} table to fill."""
    real = socket.getaddrinfo
    table: dict[str, list[str]] = {}
    state = threading.local()

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]
        return real(host, port, family, type, proto, flags)

    rules, resolve = netguard.address_problem, netguard.resolve_checked

    def address_problem(ip):
        return None if getattr(state, "public", False) and str(ip) == "127.0.0.1" else rules(ip)

    def resolve_checked(host, port, family=socket.AF_UNSPEC):
        state.public = host in PUBLIC_NAMES
        try:
            return resolve(host, port, family)
        finally:
            state.public = False

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(netguard, "address_problem", address_problem)
    monkeypatch.setattr(netguard, "resolve_checked", resolve_checked)
    monkeypatch.delenv("DINOV2_ALLOW_PRIVATE", raising=False)
    return table


def test_names_are_judged_by_the_addresses_they_resolve_to(http_server, fake_dns):
    http_server.add("/cat.jpg", body=jpeg(2), headers={"Content-Type": "image/jpeg"})
    port = http_server.port
    fake_dns["public.test"] = ["127.0.0.1"]  # the stand-in for a public address
    fake_dns["internal.test"] = ["127.0.0.2"]  # a name that resolves to loopback
    fake_dns["metadata.test"] = ["169.254.169.254"]
    fake_dns["mixed.test"] = ["10.0.0.7", "127.0.0.1"]  # only the permitted address is used
    with Fetcher(FetchConfig(deadline=5, retries=0)) as f:
        assert f.fetch(f"http://public.test:{port}/cat.jpg").ok
        r = f.fetch(f"http://internal.test:{port}/cat.jpg")
        assert r.tag == "blocked-address" and "internal.test -> 127.0.0.2 is a loopback address" in r.reason, r
        r = f.fetch(f"http://metadata.test:{port}/cat.jpg")
        assert r.tag == "blocked-address" and "169.254.169.254 is a link-local address" in r.reason, r
        assert not r.transient
        assert f.fetch(f"http://mixed.test:{port}/cat.jpg").ok
    assert http_server.count("/cat.jpg") == 2


def test_the_connection_goes_to_the_address_that_was_checked(http_server, fake_dns, monkeypatch):
    """One lookup per connection, and the socket connects to its checked answer: a name whose next answer
    would be a loopback address (DNS rebinding) cannot swap it."""
    http_server.add("/cat.jpg", body=jpeg(3), headers={"Content-Type": "image/jpeg"})
    answers = iter([["127.0.0.1"]] + [["127.0.0.2"]] * 10)  # the first answer passes, the next ones would not
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, family=0, type=0, proto=0, flags=0):
        if host == "rebind.test":
            ips = next(answers)
            calls.append(ips)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    peers = []
    connect = socket.socket.connect

    def spy(sock, address):
        peers.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    with Fetcher(FetchConfig(deadline=5, retries=0)) as f:
        r = f.fetch(f"http://rebind.test:{http_server.port}/cat.jpg")
    assert r.ok, r
    assert calls == [["127.0.0.1"]]  # resolved once
    assert peers == [("127.0.0.1", http_server.port)]


def test_every_redirect_hop_is_checked(http_server, fake_dns):
    port = http_server.port
    fake_dns["public.test"] = ["127.0.0.1"]
    fake_dns["internal.test"] = ["127.0.0.2"]
    http_server.add("/secret", body=b"internal data")
    targets = [f"http://127.1:{port}/secret", f"http://localhost:{port}/secret", f"http://2130706433:{port}/secret",
               f"http://[::ffff:127.0.0.1]:{port}/secret", f"http://internal.test:{port}/secret",
               "http://169.254.169.254/latest/meta-data/"]
    with Fetcher(FetchConfig(deadline=5, retries=0)) as f:
        for i, target in enumerate(targets):
            http_server.add(f"/r{i}", status=302, headers={"Location": target})
            r = f.fetch(f"http://public.test:{port}/r{i}")
            assert not r.ok and r.tag == "blocked-address" and not r.transient, (target, r)
        # a second hop: public -> public -> blocked
        http_server.add("/hop", status=301, headers={"Location": f"http://public.test:{port}/r0"})
        r = f.fetch(f"http://public.test:{port}/hop")
        assert r.tag == "blocked-address", r
    assert http_server.count("/secret") == 0


def test_cli_refuses_private_addresses_unless_allowed(http_server, env, tmp_path):
    img = http_server.add("/a.jpg", body=jpeg(4), headers={"Content-Type": "image/jpeg"})
    port = http_server.port
    http_server.add("/b.jpg", body=jpeg(5), headers={"Content-Type": "image/jpeg"})
    http_server.add("/to-b", status=302, headers={"Location": f"http://127.1:{port}/b.jpg"})
    urls = [img, f"http://localhost:{port}/b.jpg", f"http://0x7f.1:{port}/b.jpg", http_server.url("/to-b")]
    csv = write_csv(tmp_path / "data.csv", urls)
    strict = {k: v for k, v in env.items() if k != "DINOV2_ALLOW_PRIVATE"}

    def run(db, *args, e=strict):
        p = subprocess.run([sys.executable, "cli.py", "ingest", "--csv", str(csv), "--db", str(db), "--json", "-q",
                            *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=90)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    s = run(tmp_path / "strict.db")
    assert s["failed"] == 4 and s["failure_reasons"] == {"blocked-address": 4}, s
    rows = rows_by_url(tmp_path / "strict.db")
    assert all(r["error"].startswith("blocked-address: ") for r in rows.values())
    assert http_server.count() == 0  # not even the first hop of the redirect
    s = run(tmp_path / "allowed.db", "--allow-private")
    assert (s["new"], s["failed"], s["duplicate"]) == (2, 0, 2), s
    s = run(tmp_path / "env.db", e={**strict, "DINOV2_ALLOW_PRIVATE": "1"})
    assert s["new"] == 2 and s["failed"] == 0, s
    # query --url: a one-line refusal, then the same with --allow-private
    q = [sys.executable, "cli.py", "query", "--url", img, "--db", str(tmp_path / "allowed.db"), "--json"]
    p = subprocess.run(q, cwd=ROOT, env=strict, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "blocked-address" in p.stderr, p.stderr
    p = subprocess.run(q + ["--allow-private"], cwd=ROOT, env=strict, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["score"] > 0.999
