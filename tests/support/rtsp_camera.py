"""A real RTSP camera for tests and benchmarks: GStreamer's RTSP server with live test patterns.

Runs under Debian's own ``/usr/bin/python3`` (the GObject bindings live there, not in a venv):

    /usr/bin/python3 tests/support/rtsp_camera.py [--port 0] [--host 127.0.0.1]

Prints ``READY <port>`` once it listens, then serves until stdin closes or it is signalled.
Mount points (all live, shared between clients like a real camera):

    /h264        640x360 25 fps, ~800 kbps, keyframe every 2 s
    /h264-gop1   the same with a keyframe every second
    /h264-gop4   the same with a keyframe every 4 s
    /h264-busy   640x360 25 fps, moving bars using the full ~800 kbps (~100 RTP packets/s)
    /h264-hd     1920x1080 25 fps, moving bars, ~4 Mbps, keyframe every 2 s
    /h264-bframes  640x360 25 fps H.264 main profile with B-frames
    /h265        640x360 25 fps H.265
    /mjpeg       640x360 25 fps Motion JPEG
    /h264-pcmu   /h264 plus G.711 µ-law audio
    /h264-opus   /h264 plus Opus audio
    /h264-aac    /h264 plus AAC audio
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


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
    "/h264-busy": f"( {video(640, 360, 800, 50, BUSY)} )",
    "/h264-hd": f"( {video(1920, 1080, 4000, 50, BUSY)} )",
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for path, launch in MOUNTS.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"FAILED cannot listen on {args.host}:{args.port}", flush=True)
        sys.exit(1)

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)

    def quit_when_stdin_closes() -> None:
        sys.stdin.read()
        GLib.idle_add(loop.quit)

    threading.Thread(target=quit_when_stdin_closes, daemon=True).start()
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
