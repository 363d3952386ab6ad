"""A real RTSP camera for tests and benchmarks: GStreamer's RTSP server with live test patterns.

Runs under Debian's own ``/usr/bin/python3`` (the GObject bindings live there, not in a venv):

    /usr/bin/python3 tests/support/rtsp_camera.py [--port 0] [--host 127.0.0.1]
        [--protocols any|tcp|udp] [--digest USER:PASSWORD] [--require ELEMENT ...]
        [--report-sessions]

Prints ``READY <port>`` once it listens, then serves until stdin closes or it is signalled.
A line ``SESSIONS <mount>`` on stdin is answered on stdout with ``SESSIONS <mount> <n>``: the
RTSP sessions now playing that mount (a client that tore its session down is not counted).
If it can't serve (the GObject bindings or a GStreamer element its mounts use is missing, the
port is taken) it prints one ``FAILED <why, and which Debian package to install>`` line and
exits with status 1, at once: a missing element would otherwise only show as a 5XX answer to
the first client.

``--protocols`` makes it a camera that takes only RTSP over TCP (interleaved) or only over
UDP, answering other requests ``461 Unsupported transport``, as many real cameras do.
``--digest`` makes every mount require that user and password (HTTP digest authentication;
anything else is answered ``401 Unauthorized``). ``--require`` adds an element to the
start-up check (the test of the check itself uses an element that doesn't exist).
``--report-sessions`` prints ``SESSIONS <n>`` each time the number of connected RTSP clients
changes (a client connected or its connection closed), so a test can assert that a camera
never had two readers at once.
Mount points (all live, shared between clients like a real camera):

    /h264        640x360 25 fps, ~800 kbps, keyframe every 2 s
    /h264-gop1   the same with a keyframe every second
    /h264-gop4   the same with a keyframe every 4 s
    /h264-gop10  the same with a keyframe every 10 s (a late joiner's test: time to spare)
    /h264-busy   640x360 25 fps, moving bars using the full ~800 kbps (~100 RTP packets/s)
    /h264-hd     1920x1080 25 fps, moving bars, ~4 Mbps, keyframe every 2 s
    /h264-720    1280x720 25 fps, ~1.5 Mbps, keyframe every 2 s (a camera's main stream)
    /h264-180    320x180 25 fps, ~250 kbps, keyframe every 2 s (its sub stream)
    /h264-bframes  640x360 25 fps H.264 main profile with B-frames
    /h265        640x360 25 fps H.265
    /mjpeg       640x360 25 fps Motion JPEG
    /h264-pcmu   /h264 plus G.711 µ-law audio
    /h264-opus   /h264 plus Opus audio
    /h264-aac    /h264 plus AAC audio
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from typing import Any, NoReturn


def video(width: int, height: int, kbps: int, gop: int, pattern: str = "ball") -> str:
    return (
        f"videotestsrc is-live=true pattern={pattern} ! video/x-raw,width={width},height={height},"
        f"framerate=25/1 ! timeoverlay ! x264enc tune=zerolatency speed-preset=ultrafast "
        f"bitrate={kbps} key-int-max={gop} ! video/x-h264,profile=constrained-baseline ! "
        f"rtph264pay name=pay0 pt=96 config-interval=1"
    )


#: Moving colour bars: enough detail to use the bitrate a real camera would (the ball pattern
#: compresses to a fraction of it).
BUSY = "smpte horizontal-speed=8"
AUDIO_SOURCE = "audiotestsrc is-live=true wave=sine freq=440 volume=0.3"

MOUNTS = {
    "/h264": f"( {video(640, 360, 800, 50)} )",
    "/h264-gop1": f"( {video(640, 360, 800, 25)} )",
    "/h264-gop4": f"( {video(640, 360, 800, 100)} )",
    "/h264-gop10": f"( {video(640, 360, 800, 250)} )",
    "/h264-busy": f"( {video(640, 360, 800, 50, BUSY)} )",
    "/h264-hd": f"( {video(1920, 1080, 4000, 50, BUSY)} )",
    "/h264-720": f"( {video(1280, 720, 1500, 50)} )",
    "/h264-180": f"( {video(320, 180, 250, 50)} )",
    "/h264-bframes": (
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,"
        "framerate=25/1 ! timeoverlay ! x264enc speed-preset=superfast bframes=2 b-adapt=false "
        "bitrate=800 key-int-max=50 ! video/x-h264,profile=main ! "
        "rtph264pay name=pay0 pt=96 config-interval=1 )"
    ),
    "/h265": (
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,"
        "framerate=25/1 ! timeoverlay ! x265enc speed-preset=ultrafast tune=zerolatency "
        "bitrate=800 key-int-max=50 ! rtph265pay name=pay0 pt=96 config-interval=1 )"
    ),
    "/mjpeg": (
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,"
        "framerate=25/1 ! timeoverlay ! videoconvert ! video/x-raw,format=I420 ! "
        # RTP/JPEG (RFC 2435) carries only 4:2:0 and 4:2:2 baseline JPEG.
        "jpegenc quality=70 ! rtpjpegpay name=pay0 pt=26 )"
    ),
    "/h264-pcmu": (
        f"( {video(640, 360, 800, 50)} {AUDIO_SOURCE} ! audio/x-raw,rate=8000,channels=1 ! "
        "mulawenc ! rtppcmupay name=pay1 pt=0 )"
    ),
    "/h264-opus": (
        f"( {video(640, 360, 800, 50)} {AUDIO_SOURCE} ! audio/x-raw,rate=48000,channels=2 ! "
        "opusenc ! rtpopuspay name=pay1 pt=111 )"
    ),
    "/h264-aac": (
        f"( {video(640, 360, 800, 50)} {AUDIO_SOURCE} ! audio/x-raw,rate=44100,channels=2 ! "
        "avenc_aac ! rtpmp4gpay name=pay1 pt=97 )"
    ),
}


#: Elements GStreamer's RTSP server creates itself for every client (RTP session, UDP, TCP).
SERVER_ELEMENTS = (
    "rtpbin",
    "udpsrc",
    "multiudpsink",
    "appsrc",
    "appsink",
    "queue",
    "tee",
    "funnel",
)

#: The Debian 12 package of every element used here (found with gst-inspect-1.0 and dpkg -S).
ELEMENT_PACKAGES = {
    "videotestsrc": "gstreamer1.0-plugins-base",
    "audiotestsrc": "gstreamer1.0-plugins-base",
    "videoconvert": "gstreamer1.0-plugins-base",
    "opusenc": "gstreamer1.0-plugins-base",
    "appsrc": "gstreamer1.0-plugins-base",
    "appsink": "gstreamer1.0-plugins-base",
    "timeoverlay": "gstreamer1.0-x",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "x265enc": "gstreamer1.0-plugins-bad",
    "avenc_aac": "gstreamer1.0-libav",
    "jpegenc": "gstreamer1.0-plugins-good",
    "mulawenc": "gstreamer1.0-plugins-good",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "rtph265pay": "gstreamer1.0-plugins-good",
    "rtpjpegpay": "gstreamer1.0-plugins-good",
    "rtppcmupay": "gstreamer1.0-plugins-good",
    "rtpopuspay": "gstreamer1.0-plugins-good",
    "rtpmp4gpay": "gstreamer1.0-plugins-good",
    "rtpbin": "gstreamer1.0-plugins-good",
    "udpsrc": "gstreamer1.0-plugins-good",
    "multiudpsink": "gstreamer1.0-plugins-good",
    "queue": "libgstreamer1.0-0",
    "tee": "libgstreamer1.0-0",
    "funnel": "libgstreamer1.0-0",
}

#: What ``import gi`` and each typelib need (Debian 12 package names).
BINDING_PACKAGES = {
    "gi": "python3-gi",
    "Gst": "gir1.2-gstreamer-1.0",
    "GstRtsp": "gir1.2-gst-plugins-base-1.0",
    "GstRtspServer": "gir1.2-gst-rtsp-server-1.0",
}


def fail(reason: str) -> NoReturn:
    """Report why the camera can't serve, on the line a waiting test reads instead of READY."""
    print(f"FAILED {reason}", flush=True)
    sys.exit(1)


def import_gstreamer() -> tuple[Any, Any, Any, Any]:
    """GLib, Gst, GstRtsp and GstRtspServer, or a FAILED line naming the missing package."""
    try:
        import gi
    except ImportError:
        fail(
            "cannot import gi (the GObject bindings): run this with Debian's /usr/bin/python3 "
            f"and install {BINDING_PACKAGES['gi']}"
        )
    for namespace in ("Gst", "GstRtsp", "GstRtspServer"):
        try:
            gi.require_version(namespace, "1.0")
        except ValueError:
            fail(
                f"GObject typelib {namespace} 1.0 not found: install {BINDING_PACKAGES[namespace]}"
            )
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer

    return GLib, Gst, GstRtsp, GstRtspServer


def elements_of(launch: str) -> list[str]:
    """The element names in a launch line: every word that is neither a property nor caps."""
    words = re.split(r"[\s!()]+", launch)
    return [w for w in words if w and "=" not in w and "/" not in w]


def missing_elements_message(gst: Any, required: list[str]) -> str | None:
    """One sentence naming each missing element and its package, or None if all exist."""
    missing = [name for name in dict.fromkeys(required) if gst.ElementFactory.find(name) is None]
    if not missing:
        return None
    named = ", ".join(
        f"{name} (Debian package {ELEMENT_PACKAGES.get(name, 'unknown')})" for name in missing
    )
    packages = sorted({ELEMENT_PACKAGES[name] for name in missing if name in ELEMENT_PACKAGES})
    install = f"; install: apt-get install {' '.join(packages)}" if packages else ""
    return f"missing GStreamer element(s): {named}{install}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--protocols",
        choices=("any", "tcp", "udp"),
        default="any",
        help="RTSP lower transports to accept (others get 461 Unsupported transport)",
    )
    parser.add_argument(
        "--digest", metavar="USER:PASSWORD", help="require digest authentication on every mount"
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="ELEMENT",
        help="also check that this element exists at start",
    )
    parser.add_argument(
        "--report-sessions",
        action="store_true",
        help="print SESSIONS <n> whenever the number of connected clients changes",
    )
    args = parser.parse_args()

    GLib, Gst, GstRtsp, GstRtspServer = import_gstreamer()
    Gst.init(None)
    required = [e for launch in MOUNTS.values() for e in elements_of(launch)]
    problem = missing_elements_message(Gst, [*required, *SERVER_ELEMENTS, *args.require])
    if problem:
        fail(problem)

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    permissions = None
    if args.digest:
        user, _, password = args.digest.partition(":")
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_digest(user, password, token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        for permission in (
            GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS,
            GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT,
        ):
            permissions.add_permission_for_role("viewer", permission, True)
    # "any" leaves the server's default (UDP, UDP multicast and TCP) as it is.
    protocols = {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP}.get(
        args.protocols
    )
    mounts = server.get_mount_points()
    for path, launch in MOUNTS.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)
        if protocols is not None:
            factory.set_protocols(protocols)
        if permissions is not None:
            factory.set_permissions(permissions)
        mounts.add_factory(path, factory)
    if args.report_sessions:
        connected = [0]  # clients whose connection is open (GLib's main loop: one thread)

        def on_closed(_client: Any) -> None:
            connected[0] -= 1
            print(f"SESSIONS {connected[0]}", flush=True)

        def on_client(_server: Any, client: Any) -> None:
            connected[0] += 1
            client.connect("closed", on_closed)
            print(f"SESSIONS {connected[0]}", flush=True)

        server.connect("client-connected", on_client)
    if server.attach(None) == 0:
        fail(f"cannot listen on {args.host}:{args.port}")

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)

    def count_sessions(mount: str) -> bool:
        playing = 0
        for session in server.get_session_pool().filter(None, None):
            media, _ = session.get_media(mount)
            playing += media is not None
        print(f"SESSIONS {mount} {playing}", flush=True)
        return False  # once

    def quit_when_stdin_closes() -> None:
        for line in sys.stdin:
            command, _, mount = line.strip().partition(" ")
            if command == "SESSIONS":
                GLib.idle_add(count_sessions, mount)
        GLib.idle_add(loop.quit)

    threading.Thread(target=quit_when_stdin_closes, daemon=True).start()
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
