"""Downloading weights from a (local, real) HTTP hub, resuming, verifying; and where commands find weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval import hub, variants
from retrieval import weights as W
from retrieval.errors import ConfigError, DownloadError, WeightsError, WeightsUnavailableError
from retrieval.variants import ModelConfig, random_params

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / "cli.py")
TINY = ModelConfig(dim=64, depth=1, grid=4)


@pytest.fixture(scope="module")
def body(tmp_path_factory) -> bytes:
    """A small but real weights file, as the hub would serve it."""
    path = W.save_params(random_params(TINY), tmp_path_factory.mktemp("src") / "model.safetensors")
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for name in ("DINOV2_WEIGHTS", "DINOV2_HUB_URL", "DINOV2_CACHE", "DINOV2_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DINOV2_HUB_URL", "http://127.0.0.1:9")  # refused: never the real hub
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "TIMEOUT", (5.0, 5.0))
    monkeypatch.setattr(hub, "RETRY_DELAY", 0.0)


def route(variant: str) -> str:
    return f"/{variants.OFFICIAL[variant][2]}/resolve/main/model.safetensors"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def range_handler(body: bytes, drop_first: int = 0, ignore_range: bool = False, reset: bool = False):
    """Serves ``body`` honouring ``Range: bytes=N-`` with 206; the first ``drop_first`` answers send the
    full Content-Length, half of the (remaining) body, then close the connection (or reset it: TCP RST)."""
    state = {"calls": 0}

    def handler(req):
        state["calls"] += 1
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range", ""))
        if m and not ignore_range:
            start = int(m.group(1))
        rest = body[start:]
        if m and not ignore_range:
            req.send_response(206)
            req.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            req.send_response(200)
        req.send_header("Content-Length", str(len(rest)))
        req.end_headers()
        if state["calls"] <= drop_first:
            req.wfile.write(rest[: len(rest) // 2])
            req.wfile.flush()
            req.close_connection = True
            if reset:
                time.sleep(0.05)  # let the client read the half before the reset
                req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                req.connection.close()
            return
        req.wfile.write(rest)

    return handler


# ---------------------------------------------------------------- download


def test_download_with_explicit_sha256(http_server, body, tmp_path, capsys):
    http_server.add(route("small"), body=body)
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body))
    assert path == tmp_path / "c" / "small" / "model.safetensors"
    assert path.read_bytes() == body
    assert files_under(tmp_path / "c") == ["small/model.safetensors"]
    err = capsys.readouterr().err
    assert "100.0%" in err and "MB/s" in err and "\r" in err
    assert W.load_params(path)[1] == TINY
    # a second call finds the verified file and makes no request
    n = http_server.count()
    assert hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body)) == path
    assert http_server.count() == n


def test_download_pinned_hash_quiet_via_env(http_server, body, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(variants.OFFICIAL, "base", (768, 12, "facebook/dinov2-base", sha(body)))
    monkeypatch.setenv("DINOV2_HUB_URL", http_server.url())
    http_server.add(route("base"), body=body)
    path = hub.download(progress=False)
    assert path == tmp_path / "cache" / "base" / "model.safetensors" and path.read_bytes() == body
    assert capsys.readouterr().err == ""


def test_unpinned_variant_reports_hash(http_server, body, tmp_path, capsys):
    assert variants.OFFICIAL["small-reg"][3] is None
    http_server.add(route("small-reg"), body=body)
    path = hub.download("small-reg", tmp_path / "c", base_url=http_server.url())
    assert path.read_bytes() == body
    assert f"sha256 {sha(body)}" in capsys.readouterr().err


def test_sha256_mismatch_leaves_nothing(http_server, body, tmp_path, monkeypatch):
    monkeypatch.setitem(variants.OFFICIAL, "small", (384, 12, "facebook/dinov2-small", "0" * 64))
    http_server.add(route("small"), body=body)
    with pytest.raises(DownloadError, match=f"sha256 mismatch: got {sha(body)}, expected {'0' * 64}"):
        hub.download("small", tmp_path / "c", base_url=http_server.url(), progress=False)
    assert files_under(tmp_path / "c") == []


def test_404_and_500_reported(http_server, tmp_path):
    with pytest.raises(DownloadError) as err:
        hub.download("small", tmp_path / "c", base_url=http_server.url(), progress=False)
    assert str(err.value).startswith(http_server.url(route("small")) + ": HTTP 404")
    http_server.add(route("small"), body=b"oops", status=500)
    with pytest.raises(DownloadError, match="HTTP 500"):
        hub.download("small", tmp_path / "c", base_url=http_server.url(), progress=False)
    assert files_under(tmp_path / "c") == []


def test_connection_refused_reported(tmp_path):
    with pytest.raises(DownloadError, match=r"http://127.0.0.1:9/facebook/dinov2-small/.*cannot connect"):
        hub.download("small", tmp_path / "c", progress=False)


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_resume_after_dropped_connection_within_one_call(http_server, body, tmp_path, capsys, reset):
    http_server.add(route("small"), handler=range_handler(body, drop_first=1, reset=reset))
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body))
    assert path.read_bytes() == body
    (_, _, first), (_, _, second) = http_server.requests
    assert "Range" not in first
    if reset:  # bytes still in flight when an RST arrives may be lost: resumed from what did arrive
        assert re.fullmatch(r"bytes=(\d+)-", second.get("Range", "bytes=0-"))
        assert int(second.get("Range", "bytes=0-")[6:-1]) <= len(body) // 2
    else:
        assert second["Range"] == f"bytes={len(body) // 2}-"
    assert "resuming" in capsys.readouterr().err
    assert files_under(tmp_path / "c") == ["small/model.safetensors"]


def test_read_timeout_resumes(http_server, body, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "TIMEOUT", (5.0, 0.3))
    calls = []

    def handler(req):
        calls.append(req.headers.get("Range"))
        m = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        req.send_response(206 if m else 200)
        if m:
            req.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        req.send_header("Content-Length", str(len(body) - start))
        req.end_headers()
        if len(calls) == 1:  # half the body, then silence
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            time.sleep(1.5)
            req.close_connection = True
            return
        req.wfile.write(body[start:])

    http_server.add(route("small"), handler=handler)
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body), progress=False)
    assert path.read_bytes() == body
    assert calls == [None, f"bytes={len(body) // 2}-"]


def test_partial_file_kept_and_resumed_by_next_call(http_server, body, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 0)
    http_server.add(route("small"), handler=range_handler(body, drop_first=1))
    with pytest.raises(DownloadError, match=r"connection .* run the command again to resume"):
        hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body), progress=False)
    part = tmp_path / "c" / "small" / "model.safetensors.part"
    assert part.read_bytes() == body[: len(body) // 2]
    assert files_under(tmp_path / "c") == ["small/model.safetensors.part"]
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body), progress=False)
    assert http_server.requests[-1][2]["Range"] == f"bytes={len(body) // 2}-"
    assert path.read_bytes() == body and W.file_sha256(path) == sha(body)
    assert files_under(tmp_path / "c") == ["small/model.safetensors"]


def test_server_ignoring_range_restarts(http_server, body, tmp_path):
    part = tmp_path / "c" / "small" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from some other file")
    http_server.add(route("small"), handler=range_handler(body, ignore_range=True))
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body), progress=False)
    assert http_server.requests[0][2]["Range"] == f"bytes={len(b'stale bytes from some other file')}-"
    assert path.read_bytes() == body


def test_complete_part_file_416(http_server, body, tmp_path):
    """A .part already holding the whole file: the server answers 416 and the file is verified as is."""
    part = tmp_path / "c" / "small" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body)

    def handler(req):
        req.send_response(416)
        req.send_header("Content-Range", f"bytes */{len(body)}")
        req.send_header("Content-Length", "0")
        req.end_headers()

    http_server.add(route("small"), handler=handler)
    path = hub.download("small", tmp_path / "c", base_url=http_server.url(), sha256=sha(body), progress=False)
    assert path.read_bytes() == body


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        hub.download("huge", tmp_path)
    with pytest.raises(ConfigError, match="not a 64-digit hex sha256"):
        hub.download("small", tmp_path, sha256="abc")


def test_offline_forbids_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_OFFLINE", "1")
    with pytest.raises(DownloadError, match="DINOV2_OFFLINE=1"):
        hub.download("small", tmp_path / "c")


# ---------------------------------------------------------------- resolve order


def test_resolve_order(http_server, body, tmp_path, monkeypatch):
    monkeypatch.setitem(variants.OFFICIAL, "base", (768, 12, "facebook/dinov2-base", sha(body)))
    monkeypatch.setenv("DINOV2_HUB_URL", http_server.url())
    http_server.add(route("base"), body=body)
    # nothing anywhere: offline gives the how-to line, online downloads the default variant
    with pytest.raises(WeightsUnavailableError, match=r"python cli.py weights download.*--weights PATH.*DINOV2_WEIGHTS"):
        hub.resolve_weights(allow_download=False)
    monkeypatch.setenv("DINOV2_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="DINOV2_OFFLINE=1"):
        hub.resolve_weights()
    assert http_server.count() == 0
    monkeypatch.delenv("DINOV2_OFFLINE")
    cached = tmp_path / "cache" / "base" / "model.safetensors"
    assert hub.resolve_weights(progress=False) == cached and cached.read_bytes() == body
    assert http_server.count() == 1
    # the cache is used before any download
    assert hub.resolve_weights() == cached and http_server.count() == 1
    # ./vit-dinov2-base.npz beats the cache
    seed = tmp_path / "vit-dinov2-base.npz"
    seed.write_bytes(b"x")
    assert hub.resolve_weights() == seed
    # $DINOV2_WEIGHTS beats it
    env_file = tmp_path / "env.safetensors"
    env_file.write_bytes(b"x")
    monkeypatch.setenv("DINOV2_WEIGHTS", str(env_file))
    assert hub.resolve_weights() == env_file
    # --weights beats everything
    explicit = tmp_path / "explicit.npz"
    explicit.write_bytes(b"x")
    assert hub.resolve_weights(explicit) == explicit
    assert hub.resolve_weights(str(explicit)) == explicit
    # a snapshot directory holding model.safetensors is accepted
    assert hub.resolve_weights(cached.parent) == cached


def test_explicit_or_env_path_must_exist(tmp_path, monkeypatch):
    (tmp_path / "vit-dinov2-base.npz").write_bytes(b"x")  # would be found, but an explicit path wins or fails
    with pytest.raises(WeightsError, match=r"missing.npz: no such file$"):
        hub.resolve_weights(tmp_path / "missing.npz")
    monkeypatch.setenv("DINOV2_WEIGHTS", str(tmp_path / "gone.safetensors"))
    with pytest.raises(WeightsError, match=r"gone.safetensors: no such file \(set in DINOV2_WEIGHTS\)"):
        hub.resolve_weights()


def test_a_variant_name_means_its_cached_weights_downloaded_once(http_server, body, tmp_path, monkeypatch):
    monkeypatch.setitem(variants.OFFICIAL, "small", (384, 12, "facebook/dinov2-small", sha(body)))
    monkeypatch.setenv("DINOV2_HUB_URL", http_server.url())
    http_server.add(route("small"), body=body)
    (tmp_path / "vit-dinov2-base.npz").write_bytes(b"x")  # the default's file: not what "small" means
    with pytest.raises(WeightsUnavailableError, match=r"no small weights found \(not downloading; looked in .*small\)"):
        hub.resolve_weights("small", allow_download=False)
    cached = tmp_path / "cache" / "small" / "model.safetensors"
    assert hub.resolve_weights("small", progress=False) == cached and cached.read_bytes() == body
    assert hub.resolve_weights("small") == cached and http_server.count() == 1  # from the cache now
    monkeypatch.setenv("DINOV2_WEIGHTS", "small")
    assert hub.resolve_weights() == cached and http_server.count() == 1
    # an existing file of that name is a path, as before
    (tmp_path / "small").write_bytes(b"mine")
    assert hub.resolve_weights("small") == Path("small")
    # offline and not cached: the one-line error names the variant
    monkeypatch.setenv("DINOV2_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"no large weights found \(DINOV2_OFFLINE=1"):
        hub.resolve_weights("large")
    assert http_server.count() == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DINOV2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.default_cache_dir() == tmp_path / "xdg" / "dinov2-retrieval"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.default_cache_dir() == Path.home() / ".cache" / "dinov2-retrieval"
    monkeypatch.setenv("DINOV2_CACHE", str(tmp_path / "mine"))
    assert hub.default_cache_dir() == tmp_path / "mine"


# ---------------------------------------------------------------- CLI


def _cli_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOV2_")}
    env.update({"DINOV2_CACHE": str(tmp_path / "cache"), "DINOV2_HUB_URL": "http://127.0.0.1:9"})
    env.update(extra)
    return env


def _cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, cwd=tmp_path,
                          env=_cli_env(tmp_path, **env), timeout=120)


def test_cli_download_and_path(http_server, body, tmp_path):
    http_server.add(route("small"), body=body)
    run = _cli(tmp_path, "weights", "download", "--variant", "small", "--sha256", sha(body),
               DINOV2_HUB_URL=http_server.url())
    assert run.returncode == 0, run.stderr
    final = tmp_path / "cache" / "small" / "model.safetensors"
    assert run.stdout.strip() == str(final)
    assert "100.0%" in run.stderr
    assert final.read_bytes() == body
    # --cache and --quiet; a wrong hash is refused with exit 2 and one line
    run = _cli(tmp_path, "weights", "download", "--variant", "small", "--cache", str(tmp_path / "other"),
               "--sha256", "1" * 64, "--quiet", DINOV2_HUB_URL=http_server.url())
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("Error: http://127.0.0.1:")
    assert "sha256 mismatch" in run.stderr
    assert files_under(tmp_path / "other") == []
    # weights path: nothing for base, offline or not, never downloads
    run = _cli(tmp_path, "weights", "path", DINOV2_HUB_URL=http_server.url())
    assert run.returncode == 2 and "python cli.py weights download" in run.stderr
    assert run.stderr.count("\n") == 1
    run = _cli(tmp_path, "weights", "path", DINOV2_WEIGHTS=str(final))
    assert run.returncode == 0 and run.stdout.strip() == str(final)
    # a variant name instead of a path: the cached file, offline
    run = _cli(tmp_path, "weights", "info", "small", DINOV2_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert str(final) in run.stdout


def test_cli_404(http_server, tmp_path):
    run = _cli(tmp_path, "weights", "download", "--quiet", DINOV2_HUB_URL=http_server.url())
    assert run.returncode == 2
    assert run.stderr.strip() == f"Error: {http_server.url(route('base'))}: HTTP 404 Not Found"


def test_cli_gallery_of_another_variant_finds_its_weights_in_the_cache(tmp_path):
    """ingest --weights small, then query and a re-run without --weights: the gallery's variant is used
    (before, commands without --weights only ever looked for the base variant)."""
    from retrieval.variants import official_config

    cached = tmp_path / "cache" / "small" / "model.safetensors"  # as `weights download --variant small` leaves it
    cached.parent.mkdir(parents=True)
    W.save_params(random_params(official_config("small", depth=1), seed=0), cached)
    images = ROOT / "demo_data" / "images"
    run = _cli(tmp_path, "ingest", "--dir", str(images), "--db", "g.db", "--weights", "small", "--quiet",
               DINOV2_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert "completed: 4 new" in run.stdout
    query = next(images.glob("*.jpg"))
    run = _cli(tmp_path, "query", str(query), "--db", "g.db", "-k", "1", "--json", DINOV2_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    top = json.loads(run.stdout)[0]
    assert top["score"] >= 0.9999 and top["url"].endswith(query.name)
    run = _cli(tmp_path, "ingest", "--dir", str(images), "--db", "g.db", "--quiet", DINOV2_OFFLINE="1")
    assert run.returncode == 0 and "0 new, 4 skipped" in run.stdout, run.stdout + run.stderr
    # an explicit choice still wins, and another model is still refused
    run = _cli(tmp_path, "query", str(query), "--db", "g.db", "--weights", "base", DINOV2_OFFLINE="1")
    assert run.returncode == 2 and run.stderr.startswith("Error: no base weights found"), run.stderr
