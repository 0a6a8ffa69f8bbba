import os
import sys
from pathlib import Path

import pytest

# The library refuses loopback/private addresses unless this is set (retrieval/netguard.py); every test's HTTP
# server is on 127.0.0.1, so the suite allows them. The SSRF tests remove it (monkeypatch.delenv).
os.environ.setdefault("DINOV2_ALLOW_PRIVATE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpserver import LocalHTTPServer  # noqa: E402


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1; add routes with ``http_server.add(path, body=..., status=...)``."""
    server = LocalHTTPServer()
    try:
        yield server
    finally:
        server.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``torch`` need the reference implementation; skip them cleanly where it is absent."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        if os.environ.get("REQUIRE_TORCH") == "1":
            raise pytest.UsageError("REQUIRE_TORCH=1 but torch/transformers are not installed")
        skip = pytest.mark.skip(reason="torch/transformers not installed (pip install -e '.[torch]')")
        for item in items:
            if "torch" in item.keywords:
                item.add_marker(skip)
