"""What can go wrong between nodes, in one tree (all are :class:`MediaStreamError`).

ClusterError
├── RedisUnavailable    Redis did not answer in time or refused the connection
├── EnvelopeError       a message from another node is not a valid envelope (names the field)
├── OwnerGone           nobody listens on the target node's inbox (PUBLISH reached 0)
├── RequestTimeout      a request and its one retry both went unanswered
├── OwnedElsewhere      another node owns the stream (names it and its epoch): route there
├── LeaseLost           this node no longer owns a stream it held (says why)
├── LeaseStateError     a lease was asked to move to a state it cannot reach from its own
└── RelayError          a relay connection failed or broke its protocol (relay.py)
    └── RelayRefused    the other side refused it (authentication, TLS, not the owner)
"""

from __future__ import annotations

from ..errors import MediaStreamError


class ClusterError(MediaStreamError):
    """Base of the cluster's errors."""


class RedisUnavailable(ClusterError):
    """Redis could not be reached or did not answer within the command timeout."""


class EnvelopeError(ClusterError):
    """A bus message that is not a valid envelope.

    Args:
        field: the envelope field that is missing or wrong (``"epoch"``), or ``"envelope"``
            when the message is not a JSON object at all.
        reason: what is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"bad envelope field {field!r}: {reason}")


class OwnerGone(ClusterError):
    """The target node's inbox has no subscriber: the node is dead or not in the cluster."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        super().__init__(f'node "{node_id}" is gone: nobody listens on its inbox')


class RequestTimeout(ClusterError):
    """A request went unanswered twice (the first try and its one retry)."""


class OwnedElsewhere(ClusterError):
    """Another node owns the stream; messages about it go to that node's inbox."""

    def __init__(self, stream_id: str, node_id: str, epoch: int) -> None:
        self.stream_id = stream_id
        self.node_id = node_id
        self.epoch = epoch
        super().__init__(f'stream "{stream_id}" is owned by node "{node_id}" (epoch {epoch})')


class LeaseLost(ClusterError):
    """This node stopped owning a stream: not renewed in time, or taken over."""


class LeaseStateError(ClusterError):
    """A lease transition that its state machine does not allow (a bug, not bad input)."""


class RelayError(ClusterError):
    """The relay connection failed or broke its protocol (says what, and with whom)."""


class RelayRefused(RelayError):
    """The other side refused the connection (authentication, TLS, not serving the stream, no
    such stream or quality)."""
