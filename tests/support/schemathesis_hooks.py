"""schemathesis hooks for ``test_api_fuzz.py``: the WHEP bodies are text (an SDP offer, a
trickle fragment), which schemathesis only knows how to send under ``text/plain``."""

import schemathesis

schemathesis.serializer.alias(["application/sdp", "application/trickle-ice-sdpfrag"], "text/plain")
