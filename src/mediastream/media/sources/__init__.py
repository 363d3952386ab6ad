"""Sources: read a camera, a file or a test pattern once, and publish its frames.

PyAV's blocking calls run in a worker thread with FFmpeg's open/read timeouts, so a dead
camera never blocks the event loop. RTSP cameras are asked for RTP over TCP first and over UDP
when they refuse TCP (``rtsp_transport = "auto"``); what worked is asked for first from then
on. H.264 is passed through untouched (only its NAL units are tidied: parameter sets in front
of every keyframe, AVCC converted to Annex B); any other codec, and every test pattern, is
encoded to H.264 **once per source**, whatever the number of viewers.

One concept per module, from the task that runs a source down to the codecs:

    run.py        run_source: attempts, backoff, pacing, one timeline (Trio)
    timeline.py   one continuous timeline per track across restarts
    reader.py     the reader thread and its handshake with Trio (no PyAV)
    demux.py      what the reader thread runs: open with PyAV, demux into frames
    rtsp.py       RTSP cameras: which transport to ask for, what refusals mean
    video.py      H.264 passthrough, or one H.264 encoder for anything else
    audio.py      G.711/Opus passthrough, or one Opus encoder for anything else

Every module logs under its own name, below this package's logger
(``mediastream.media.sources``).
"""

from ..source_contract import SourceState, describe_source
from .reader import READER_EXIT_WAIT
from .rtsp import RtspTransportMemory, rtsp_refusal_reason, rtsp_transport_order
from .run import backoff_delay, run_source
from .timeline import Timelines

__all__ = [
    "READER_EXIT_WAIT",
    "RtspTransportMemory",
    "SourceState",
    "Timelines",
    "backoff_delay",
    "describe_source",
    "rtsp_refusal_reason",
    "rtsp_transport_order",
    "run_source",
]
