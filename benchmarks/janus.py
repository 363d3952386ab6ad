"""Janus, the C WebRTC gateway, set up to restream the same RTSP camera: the reference peer.

Used by ``fanout.py --server janus``. Debian's ``janus`` package (1.1), its streaming plugin
pulling the camera, its HTTP API on loopback; everything else disabled.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import free_port

PLUGINS = "/usr/lib/x86_64-linux-gnu/janus/plugins"
TRANSPORTS = "/usr/lib/x86_64-linux-gnu/janus/transports"
ALL_PLUGINS = [
    "audiobridge",
    "duktape",
    "echotest",
    "lua",
    "nosip",
    "recordplay",
    "sip",
    "textroom",
    "videocall",
    "videoroom",
    "voicemail",
]
ALL_TRANSPORTS = ["mqtt", "nanomsg", "pfunix", "rabbitmq", "websockets"]


def _configuration(folder: Path, rtsp_url: str, http_port: int) -> None:
    disabled_plugins = ",".join(f"libjanus_{name}.so" for name in ALL_PLUGINS)
    disabled_transports = ",".join(f"libjanus_{name}.so" for name in ALL_TRANSPORTS)
    (folder / "janus.jcfg").write_text(f"""
general: {{
    configs_folder = "{folder}"
    plugins_folder = "{PLUGINS}"
    transports_folder = "{TRANSPORTS}"
    debug_level = 3
    session_timeout = 600
}}
media: {{ rtp_port_range = "40000-50000" }}
nat: {{ nice_debug = false }}
plugins: {{ disable = "{disabled_plugins}" }}
transports: {{ disable = "{disabled_transports}" }}
loggers: {{ disable = "libjanus_jsonlog.so" }}
events: {{ broadcast = false }}
""")
    (folder / "janus.transport.http.jcfg").write_text(f"""
general: {{
    json = "plain"; base_path = "/janus"; http = true; port = {http_port}; ip = "127.0.0.1"
    https = false
}}
admin: {{ admin_http = false }}
""")
    (folder / "janus.plugin.streaming.jcfg").write_text(f"""
general: {{ }}
camera: {{
    type = "rtsp"
    id = 1
    description = "benchmark camera"
    audio = false
    video = true
    url = "{rtsp_url}"
    rtsp_reconnect_delay = 5
}}
""")


@contextmanager
def running_janus(rtsp_url: str, *, cpus: str | None = None) -> Iterator[tuple[str, int]]:
    """Janus restreaming ``rtsp_url``; yields (HTTP API URL, pid). ``cpus``: pin it to these
    (``taskset -c``)."""
    binary = shutil.which("janus")
    if binary is None:
        raise SystemExit("Janus is not installed: apt-get install janus")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        _configuration(Path(folder), rtsp_url, port)
        process = subprocess.Popen(
            [
                *(["taskset", "-c", cpus] if cpus else []),
                *[binary, "-F", folder, "-C", f"{folder}/janus.jcfg", "--disable-colors"],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}/janus"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    info = json.loads(urllib.request.urlopen(url + "/info", timeout=1).read())
                    if "janus.plugin.streaming" in info.get("plugins", {}):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("Janus did not start")
                time.sleep(0.2)
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(timeout=10)
