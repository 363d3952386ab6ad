"""Parsing client messages: every field validated once, every failure a clear error."""

from __future__ import annotations

import json

import pytest

from mediastream import protocol
from mediastream.errors import ErrorCode, SignalingError
from mediastream.protocol import Close, Fallback, IceCandidate, Offer, Ping, parse_client_message

SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"


def parse(message: object, max_sdp_bytes: int = 10_000) -> protocol.ClientMessage:
    text = message if isinstance(message, str) else json.dumps(message)
    return parse_client_message(text, max_sdp_bytes=max_sdp_bytes)


def error_of(message: object, **kwargs: int) -> SignalingError:
    with pytest.raises(SignalingError) as caught:
        parse(message, **kwargs)
    return caught.value


def test_offer_with_top_level_stream_id() -> None:
    message = parse({"type": "offer", "streamId": "cam-1", "payload": {"sdp": SDP}})
    assert message == Offer("cam-1", SDP)


def test_legacy_offer_takes_stream_id_from_payload() -> None:
    message = parse({"type": "offer", "payload": {"sdp": SDP, "streamId": "plx_cctv_01"}})
    assert message == Offer("plx_cctv_01", SDP)


def test_offer_with_both_stream_ids_agreeing_is_accepted() -> None:
    message = parse({"type": "offer", "streamId": "a", "payload": {"sdp": SDP, "streamId": "a"}})
    assert isinstance(message, Offer) and message.stream_id == "a"


def test_offer_with_conflicting_stream_ids_is_refused_naming_both() -> None:
    error = error_of({"type": "offer", "streamId": "a", "payload": {"sdp": SDP, "streamId": "b"}})
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert '"a"' in error.message and '"b"' in error.message
    assert error.stream_id == "a"


def test_offer_session_id_is_kept() -> None:
    message = parse({"type": "offer", "streamId": "a", "payload": {"sdp": SDP, "sessionId": "s-1"}})
    assert isinstance(message, Offer) and message.session_id == "s-1"


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (None, ErrorCode.INVALID_MESSAGE, "payload must be an object"),
        ({}, ErrorCode.INVALID_SDP, 'no "sdp"'),
        ({"sdp": "   "}, ErrorCode.INVALID_SDP, 'no "sdp"'),
        ({"sdp": 42}, ErrorCode.INVALID_SDP, 'no "sdp"'),
        ({"sdp": "hello"}, ErrorCode.INVALID_SDP, 'start with "v=0"'),
        ({"sdp": SDP, "type": "answer"}, ErrorCode.INVALID_SDP, 'must be "offer"'),
        ({"sdp": SDP, "sessionId": "has space"}, ErrorCode.INVALID_MESSAGE, "sessionId"),
    ],
)
def test_bad_offers_are_refused_for_their_stream(
    payload: object, code: ErrorCode, fragment: str
) -> None:
    error = error_of({"type": "offer", "streamId": "cam", "payload": payload})
    assert error.code == code
    assert fragment in error.message
    assert error.stream_id == "cam"


def test_oversized_sdp_is_refused_with_its_size_and_the_limit() -> None:
    sdp = SDP + "a=x\r\n" * 100
    error = error_of(
        {"type": "offer", "streamId": "cam", "payload": {"sdp": sdp}}, max_sdp_bytes=100
    )
    assert error.code == ErrorCode.INVALID_SDP
    assert str(len(sdp)) in error.message and "100" in error.message


def test_ice_candidate() -> None:
    message = parse(
        {
            "type": "ice",
            "streamId": "cam",
            "payload": {
                "candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
                "sessionId": "s",
            },
        }
    )
    assert message == IceCandidate("cam", "candidate:1 1 udp 1 10.0.0.1 5000 typ host", "0", 0, "s")


@pytest.mark.parametrize(
    "payload", [None, {"candidate": ""}, {"candidate": None}, {"candidate": " "}]
)
def test_empty_ice_candidate_means_end_of_candidates(payload: object) -> None:
    message = parse({"type": "ice", "streamId": "cam", "payload": payload})
    assert isinstance(message, IceCandidate) and message.candidate is None


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("candidate", "must be an object"),
        ({"candidate": 5, "sdpMid": "0"}, "candidate must be a string"),
        ({"candidate": "candidate:x", "sdpMid": 0}, "sdpMid must be a string"),
        ({"candidate": "candidate:x", "sdpMLineIndex": -1}, "sdpMLineIndex"),
        ({"candidate": "candidate:x", "sdpMLineIndex": True}, "sdpMLineIndex"),
        ({"candidate": "candidate:x"}, "needs sdpMid or sdpMLineIndex"),
        ({"candidate": "c" * 2000, "sdpMid": "0"}, "longer than"),
    ],
)
def test_bad_ice_candidates_are_refused(payload: object, fragment: str) -> None:
    error = error_of({"type": "ice", "streamId": "cam", "payload": payload})
    assert error.code == ErrorCode.INVALID_CANDIDATE
    assert fragment in error.message
    assert error.stream_id == "cam"


def test_close() -> None:
    assert parse({"type": "close", "streamId": "cam"}) == Close("cam")
    only = {"type": "close", "streamId": "cam", "payload": {"fallback": True}}
    assert parse(only) == Close("cam", fallback_only=True)
    error = error_of({"type": "close", "streamId": "cam", "payload": {"fallback": "yes"}})
    assert "payload.fallback must be true or false" in error.message


def test_fallback_names_the_audio_codecs_the_browser_takes() -> None:
    assert parse({"type": "fallback", "streamId": "cam"}) == Fallback("cam")
    asked = {"type": "fallback", "streamId": "cam", "payload": {"audio": ["opus", "mp4a.40.2"]}}
    assert parse(asked) == Fallback("cam", ("opus", "mp4a.40.2"))
    for bad in ("opus", [1], [""], ["x" * 41], ["opus"] * 9):
        error = error_of({"type": "fallback", "streamId": "cam", "payload": {"audio": bad}})
        assert "payload.audio must be a list" in error.message and error.stream_id == "cam"


def test_fallback_says_its_quality_and_tile_as_an_offer_does() -> None:
    asked = {
        "type": "fallback",
        "streamId": "cam",
        "payload": {"quality": "auto", "tile": {"width": 480, "height": 270, "visible": False}},
    }
    assert parse(asked) == Fallback(
        "cam", quality="auto", tile=protocol.Tile(480, 270, visible=False)
    )
    pinned = {"type": "fallback", "streamId": "cam", "payload": {"quality": "sub"}}
    assert parse(pinned) == Fallback("cam", quality="sub")
    for payload, says in (
        ({"quality": "no spaces"}, "payload.quality must be"),
        ({"quality": 7}, "payload.quality must be"),
        ({"tile": {"width": -1, "height": 2}}, "payload.tile.width must be"),
        ({"tile": "big"}, "payload.tile must be an object"),
        ("sub", "fallback payload must be an object"),
    ):
        error = error_of({"type": "fallback", "streamId": "cam", "payload": payload})
        assert error.code is ErrorCode.INVALID_MESSAGE and error.stream_id == "cam"
        assert says in error.message


def test_ping_needs_no_stream() -> None:
    assert parse({"type": "ping", "payload": {"t": 1}}) == Ping({"t": 1})


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE),
        ('"offer"', ErrorCode.INVALID_MESSAGE),
        ('{"streamId": "cam"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": 5, "streamId": "cam"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "close"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "close", "streamId": ""}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "close", "streamId": "a b"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "close", "streamId": 7}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_malformed_messages_are_refused(text: str, code: ErrorCode) -> None:
    assert error_of(text).code == code


def test_unknown_type_names_the_type_and_the_known_ones() -> None:
    error = error_of({"type": "subscribe", "streamId": "cam"})
    assert error.code == ErrorCode.UNKNOWN_TYPE
    assert '"subscribe"' in error.message and "offer" in error.message
    assert error.stream_id == "cam"


def test_invalid_utf8_bytes_are_invalid_json() -> None:
    with pytest.raises(SignalingError) as caught:
        parse_client_message(b"\xff\xfe{", max_sdp_bytes=100)
    assert caught.value.code == ErrorCode.INVALID_JSON


def test_server_messages_have_the_wire_shape() -> None:
    assert json.loads(protocol.answer("cam", "v=0...")) == {
        "type": "answer",
        "streamId": "cam",
        "payload": "v=0...",
    }
    assert json.loads(
        protocol.error(ErrorCode.STREAM_NOT_FOUND, "Stream not found", "cam", "s1")
    ) == {
        "type": "error",
        "streamId": "cam",
        "payload": "Stream not found",
        "code": "stream_not_found",
        "sessionId": "s1",
    }
    assert json.loads(protocol.state("cam", "live")) == {
        "type": "state",
        "streamId": "cam",
        "payload": {"state": "live"},
    }


# --- a page's shared peer connection (streamId "~…") ------------------------------------------


def test_an_offer_to_a_shared_peer_connection_maps_mids_to_streams() -> None:
    message = parse(
        {
            "type": "offer",
            "streamId": "~abc-pc1",
            "payload": {"type": "offer", "sdp": SDP, "streams": {"1": "cam-1", "2": "cam-2"}},
        }
    )
    assert message == protocol.PeerOffer("~abc-pc1", SDP, {"1": "cam-1", "2": "cam-2"})


def test_applied_ice_and_close_address_a_shared_peer_connection() -> None:
    assert parse({"type": "applied", "streamId": "~p", "payload": {}}) == protocol.PeerApplied("~p")
    assert parse({"type": "close", "streamId": "~p"}) == Close("~p")
    ice = parse({"type": "ice", "streamId": "~p", "payload": {"candidate": "", "sdpMid": "0"}})
    assert isinstance(ice, IceCandidate) and ice.stream_id == "~p" and ice.candidate is None


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"type": "offer", "streamId": "~p", "payload": {"sdp": SDP}}, "payload.streams"),
        (
            {"type": "offer", "streamId": "~p", "payload": {"sdp": SDP, "streams": {"1": "~q"}}},
            "payload.streams",
        ),
        (
            {"type": "offer", "streamId": "~p", "payload": {"sdp": SDP, "streams": {"a b": "c"}}},
            "payload.streams",
        ),
        ({"type": "fallback", "streamId": "~p"}, "Unknown message type"),
        ({"type": "offer", "streamId": "~p q", "payload": {"sdp": SDP}}, 'is "~" and'),
        ({"type": "applied", "streamId": "cam-1"}, "shared peer connection"),
    ],
)
def test_bad_shared_peer_messages_say_what_is_wrong(message: object, fragment: str) -> None:
    assert fragment in error_of(message).message


def test_errors_and_states_of_a_shared_connection_name_their_stream() -> None:
    error = json.loads(
        protocol.error(ErrorCode.STREAM_NOT_FOUND, "Stream not found", "~p", None, "cam-9")
    )
    assert error["streamId"] == "~p" and error["stream"] == "cam-9"
    state = json.loads(protocol.state("~p", "live", member="cam-1"))
    assert state["payload"] == {"state": "live", "stream": "cam-1"}


def test_quality_pins_a_name_or_auto_and_reports_a_tile() -> None:
    message = parse(
        {
            "type": "quality",
            "streamId": "gate",
            "payload": {"quality": "auto", "tile": {"width": 639.6, "height": 360}},
        }
    )
    assert message == protocol.QualityRequest("gate", "auto", protocol.Tile(640, 360, True))
    hidden = parse(
        {
            "type": "quality",
            "streamId": "gate",
            "payload": {"tile": {"width": 0, "height": 0, "visible": False}},
        }
    )
    assert hidden == protocol.QualityRequest("gate", None, protocol.Tile(0, 0, False))


def test_an_offer_may_say_where_the_viewer_starts() -> None:
    payload = {"sdp": SDP, "quality": "sub", "tile": {"width": 320, "height": 180}}
    message = parse({"type": "offer", "streamId": "gate", "payload": payload})
    assert isinstance(message, Offer)
    assert (message.quality, message.tile) == ("sub", protocol.Tile(320, 180, True))


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (None, "must be an object"),
        ({}, 'needs "quality"'),
        ({"quality": ""}, "payload.quality"),
        ({"quality": 3}, "payload.quality"),
        ({"quality": "x" * 40}, "payload.quality"),
        ({"tile": [1, 2]}, "payload.tile must be an object"),
        ({"tile": {"width": -1, "height": 1}}, "payload.tile.width"),
        ({"tile": {"width": 1, "height": 10**6}}, "payload.tile.height"),
        ({"tile": {"width": True, "height": 1}}, "payload.tile.width"),
        ({"tile": {"width": 1, "height": 1, "visible": "yes"}}, "payload.tile.visible"),
    ],
)
def test_bad_quality_messages_say_what_is_wrong(payload: object, fragment: str) -> None:
    error = error_of({"type": "quality", "streamId": "gate", "payload": payload})
    assert error.code is ErrorCode.INVALID_MESSAGE
    assert error.stream_id == "gate"
    assert fragment in error.message
