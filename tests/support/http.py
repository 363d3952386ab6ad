"""A small HTTP/1.1 client over Trio sockets, for tests: exact control of headers and EOF."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    read_to_eof: bool = False,
    timeout: float = 10,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """One request on a fresh connection.

    ``read_to_eof`` reads until the server closes the connection (with ``Connection: close``),
    which a server that never closes idle connections would make hang: bounded by ``timeout``.
    """
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    all_headers = {"Host": parts.netloc, "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {target or '/'} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in all_headers.items()
    )
    with trio.fail_after(timeout):
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        stream: trio.abc.Stream
        if parts.scheme == "https":
            stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl_context or ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(head.encode() + b"\r\n" + body)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed before the headers: {data!r}")
                data += chunk
            raw_head, rest = data.split(b"\r\n\r\n", 1)
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            response_headers = {
                k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])
            }
            if read_to_eof:
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            else:
                length = int(response_headers.get("content-length", "0"))
                while len(rest) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    rest += chunk
            return HttpResponse(status, response_headers, rest)


async def get(url: str, **kwargs: Any) -> HttpResponse:
    return await request(url, **kwargs)


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, keyed by name and sorted labels."""
    response = await get(url + "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
