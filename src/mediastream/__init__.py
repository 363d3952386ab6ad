"""MediaStream: live camera streams in web browsers over WebRTC, one signaling socket per page."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mediastream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
