"""The test camera's start-up check: every element it uses is known and found, or named.

``rtsp_camera.py`` imports the GStreamer bindings only in ``main``, so its check runs here
under the venv's Python with a stand-in for ``Gst`` (the real camera's check is run in
tests/integration/test_rtsp_cameras.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from support.rtsp_camera import (
    ELEMENT_PACKAGES,
    MOUNTS,
    SERVER_ELEMENTS,
    elements_of,
    missing_elements_message,
)


def gst_without(*missing: str) -> SimpleNamespace:
    def find(name: str) -> object | None:
        return None if name in missing else object()

    return SimpleNamespace(ElementFactory=SimpleNamespace(find=find))


def test_every_element_the_camera_uses_has_its_debian_package_listed() -> None:
    used = {e for launch in MOUNTS.values() for e in elements_of(launch)} | set(SERVER_ELEMENTS)
    assert used - ELEMENT_PACKAGES.keys() == set()


def test_elements_are_read_from_launch_lines_with_caps_properties_and_second_chains() -> None:
    assert elements_of(MOUNTS["/h264-aac"]) == [
        "videotestsrc", "timeoverlay", "x264enc", "rtph264pay",
        "audiotestsrc", "avenc_aac", "rtpmp4gpay",
    ]  # fmt: skip


def test_a_missing_element_is_named_with_its_package_and_the_install_command() -> None:
    message = missing_elements_message(gst_without("timeoverlay"), ["videotestsrc", "timeoverlay"])
    assert message == (
        "missing GStreamer element(s): timeoverlay (Debian package gstreamer1.0-x); "
        "install: apt-get install gstreamer1.0-x"
    )


def test_several_missing_elements_are_all_named_once() -> None:
    message = missing_elements_message(
        gst_without("x264enc", "avenc_aac", "nosuch"), ["x264enc", "x264enc", "avenc_aac", "nosuch"]
    )
    assert message == (
        "missing GStreamer element(s): x264enc (Debian package gstreamer1.0-plugins-ugly), "
        "avenc_aac (Debian package gstreamer1.0-libav), nosuch (Debian package unknown); "
        "install: apt-get install gstreamer1.0-libav gstreamer1.0-plugins-ugly"
    )


def test_nothing_to_say_when_everything_is_there() -> None:
    assert missing_elements_message(gst_without(), ["x264enc"]) is None
