"""A node holding one stream lease, in its own process (so a test can SIGSTOP it).

    python lease_holder.py REDIS_URL STREAM NODE TTL RENEW_INTERVAL SAFETY_MARGIN

Prints one JSON object per line, each with ``mono`` (``time.monotonic()``, shared by every
process on the machine, so a test can order events across processes):
``held`` (with ``epoch``), ``tick`` each time its stand-in ingest acts (only after
``lease.check()`` passed), ``lost`` (with ``reason``), then exits.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import trio

from mediastream.cluster.errors import LeaseLost
from mediastream.cluster.leases import hold_stream_lease
from mediastream.cluster.redis_client import open_redis

TICK = 0.05  # seconds between two acts of the stand-in ingest


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "mono": time.monotonic(), **fields}), flush=True)


async def main(url: str, stream: str, node: str, ttl: float, renew: float, margin: float) -> None:
    async with open_redis(url) as client, trio.open_nursery() as nursery:
        hold = functools.partial(
            hold_stream_lease, ttl=ttl, renew_interval=renew, safety_margin=margin
        )
        lease = await nursery.start(hold, client, stream, node)
        emit("held", epoch=lease.epoch)
        with trio.CancelScope() as ingest:
            lease.cancel_on_loss(ingest)
            while True:
                try:
                    lease.check()
                except LeaseLost:
                    break
                emit("tick")
                await trio.sleep(TICK)
        await lease.lost.wait()
        emit("lost", reason=lease.loss_reason)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    url, stream, node, ttl, renew, margin = sys.argv[1:7]
    trio.run(main, url, stream, node, float(ttl), float(renew), float(margin))
