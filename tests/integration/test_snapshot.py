"""Snapshots: one keyframe of the live stream, as a JPEG of the stream's size."""

from __future__ import annotations

import av

from support.http import get
from support.servers import Camera, StartServer, make_config
from support.viewer import open_viewer


def decode_jpeg(data: bytes) -> tuple[str, int, int]:
    import io

    with av.open(io.BytesIO(data), format="mjpeg") as container:
        picture = next(container.decode(video=0))
        return container.streams.video[0].codec_context.name, picture.width, picture.height


async def test_a_snapshot_is_a_jpeg_of_the_live_stream(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url("/h264")}]))
    stream = server.services.registry.get("cam")
    assert stream is not None
    # Stopped, and asked only for what is cached: nothing to show, and the camera stays off.
    cached_only = await get(server.url + "/api/streams/cam/snapshot.jpg?cached=1")
    assert cached_only.status == 503 and not stream.source_running
    async with open_viewer(server.ws_url) as viewer:
        await (await viewer.play("cam")).wait_frames(5)
        response = await get(server.url + "/api/streams/cam/snapshot.jpg")
        again = await get(server.url + "/api/streams/cam/snapshot.jpg?cached=1")
    assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.body[:2] == b"\xff\xd8"
    assert decode_jpeg(response.body) == ("mjpeg", 640, 360)
    assert again.status == 200


async def test_a_snapshot_of_a_stopped_stream_starts_it_briefly(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(
        make_config(
            [{"id": "cam", "source": camera.url("/h264-hd")}], media={"on_demand_grace": 0.5}
        )
    )
    stream = server.services.registry.get("cam")
    assert stream is not None and not stream.source_running
    response = await get(server.url + "/api/streams/cam/snapshot.jpg", timeout=30)
    assert response.status == 200
    assert decode_jpeg(response.body)[1:] == (1920, 1080)
    assert stream.viewers == 0  # a snapshot is not a viewer
    await server.services.changes.wait_until(lambda: not stream.source_running)
