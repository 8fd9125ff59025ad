"""Signed https scenes whose server refuses them: the reason given, and no signature in any log.

The server runs in its own process on 127.0.0.1 (GDAL may hold the GIL while it waits for a reply):
it answers 403 to every request, or 503 (which GDAL retries, warning each time) under /busy/.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from uhr.errors import SceneError
from uhr.scenes import open_scene
from uhr.storage import StorageConfig

SIGNATURE = "uhr-not-a-real-signature"

SERVER = """
import http.server, sys

class Refusing(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
        self.send_error(503 if self.path.startswith("/busy/") else 403)

    do_GET = do_HEAD = _refuse

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def refusing_server() -> Iterator[str]:
    """Base URL of a loopback server refusing every request."""
    process = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def test_a_refused_signed_url_says_so_instead_of_not_found(refusing_server):
    uri = f"{refusing_server}/archive/scene.tif?X-Amz-Expires=60&X-Amz-Signature={SIGNATURE}"
    with pytest.raises(SceneError) as caught:
        open_scene(uri)
    reason = caught.value.reason
    assert "403" in reason and "no such file" not in reason
    # The extension is the URL path's: the query string does not hide the .tif.
    assert "extensions" not in reason
    assert SIGNATURE not in str(caught.value)


def test_gdal_retry_warnings_never_show_the_signature(refusing_server, caplog):
    uri = f"{refusing_server}/busy/scene.tif?X-Amz-Signature={SIGNATURE}"
    storage = StorageConfig(gdal_options={"GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "0.1"})
    with caplog.at_level(logging.DEBUG), pytest.raises(SceneError):
        open_scene(uri, storage=storage)
    retries = [record for record in caplog.records if "retry" in record.getMessage().lower()]
    assert retries, "GDAL warns about each retry through rasterio's logger"
    leaked = [f"{r.name}: {r.getMessage()}" for r in caplog.records if SIGNATURE in r.getMessage()]
    assert not leaked
