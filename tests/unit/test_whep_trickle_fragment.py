"""The WHEP trickle fragment (RFC 8840) as the server reads it: no sockets."""

from __future__ import annotations

import pytest

from mediastream.protocol import IceCandidate
from mediastream.whep import WhepRefused, parse_trickle_fragment

HOST = "candidate:1 1 udp 2130706431 192.0.2.10 50000 typ host"


def test_candidates_belong_to_the_mid_of_their_section_and_end_of_candidates_is_none() -> None:
    fragment = parse_trickle_fragment(
        "cam-1",
        "a=ice-ufrag:abcd\r\na=ice-pwd:secret\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        f"a={HOST}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:1\r\na={HOST}\r\n"
        "a=end-of-candidates\r\n",
    )
    assert (fragment.ice_ufrag, fragment.ice_pwd) == ("abcd", "secret")
    assert fragment.candidates == (
        IceCandidate("cam-1", HOST, "0", None),
        IceCandidate("cam-1", HOST, "1", None),
        IceCandidate("cam-1", None, "1", None),
    )


def test_a_candidate_outside_any_section_belongs_to_the_first_media() -> None:
    fragment = parse_trickle_fragment("cam-1", f"a={HOST}\na=end-of-candidates\n")
    assert fragment.candidates == (
        IceCandidate("cam-1", HOST, None, 0),
        IceCandidate("cam-1", None, None, 0),
    )
    assert fragment.ice_ufrag is None


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("a=candidate:1 1 udp\r\n", "Line 1 is not an ICE candidate"),
        (f"a=ice-ufrag:x\r\n{HOST}\r\n", "Line 2 is not an SDP line"),
        ("a=candidate:" + "1 " * 600 + "\r\n", "Line 1 is not an ICE candidate"),
    ],
)
def test_a_line_that_is_not_an_ice_attribute_is_refused_by_its_number(
    body: str, named: str
) -> None:
    with pytest.raises(WhepRefused) as refused:
        parse_trickle_fragment("cam-1", body)
    assert refused.value.status == 400 and named in refused.value.message
