"""A real slow link on this machine: a network namespace behind a rate-limited veth pair.

    with slow_link(rate_kbit=200) as link:
        link.exec_command(".venv/bin/python", "script.py")  # runs inside the namespace
        link.qdisc_statistics()                             # what the shaper holds and sent

The namespace gets a veth pair and one /30 of link-local addresses (169.254.0.0/16: they
exist on this machine only and route nowhere else): ``link.host_address`` on the root side,
``link.peer_address`` inside. The root side's qdisc is a token bucket (``tbf``) with a large
queue limit, so traffic towards the namespace *queues* there instead of being dropped. A
queued UDP datagram stays charged to the socket that sent it until it leaves the qdisc, so a
sender faster than the link fills its socket's send buffer and ``sendto`` returns EAGAIN: the
backpressure a server meets on a real slow uplink. (Over loopback it never does: each
datagram is handed to the receiver, and uncharged, inside ``sendto``.)

Everything is removed on exit (deleting the namespace deletes its veth end, and with it the
pair), even when the block fails. Needs root (``CAP_NET_ADMIN``) and iproute2's ``ip`` and
``tc``; without them :class:`NetnsUnavailable` says why, for the test to skip.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")


class NetnsUnavailable(RuntimeError):
    """This machine or user can't make network namespaces (not root, no iproute2)."""


@dataclass(frozen=True)
class QdiscStatistics:
    sent_bytes: int
    sent_packets: int
    dropped: int
    overlimits: int
    backlog_bytes: int
    backlog_packets: int


@dataclass(frozen=True)
class SlowLink:
    namespace: str
    host_device: str  # the root side's veth, where the shaper sits
    host_address: str  # the root side's address, reachable from inside the namespace
    peer_address: str  # the namespace side's address
    rate_kbit: int

    def exec_command(self, *command: str) -> list[str]:
        """``command`` run inside the namespace (a list for ``subprocess``/``trio``)."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def qdisc_statistics(self) -> QdiscStatistics:
        """The shaper's counters (``tc -s qdisc show``): sent, dropped, and queued now."""
        text = _run("tc", "-s", "qdisc", "show", "dev", self.host_device)
        sent = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text)
        backlog = re.search(r"backlog (\d+)([KMG]?)b (\d+)p", text)
        if sent is None or backlog is None:
            raise RuntimeError(f"unexpected tc output: {text!r}")
        scale = {"": 1, "K": 1000, "M": 1000_000, "G": 1000_000_000}[backlog.group(2)]
        return QdiscStatistics(
            sent_bytes=int(sent.group(1)),
            sent_packets=int(sent.group(2)),
            dropped=int(sent.group(3)),
            overlimits=int(sent.group(4)),
            backlog_bytes=int(backlog.group(1)) * scale,
            backlog_packets=int(backlog.group(3)),
        )


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, command, result.stdout, result.stderr
        )
    return result.stdout


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of 169.254.0.0/16 that no interface of this machine uses (a concurrent run of
    this test included), chosen from ``seed`` so that parallel runs start apart."""
    in_use = [
        ipaddress.ip_interface(address).network
        for address in re.findall(r"inet (\S+)", _run("ip", "-4", "-o", "addr", "show"))
    ]
    subnets = list(LINK_LOCAL.subnets(new_prefix=30))[64:-64]  # not 169.254.0.x/255.x
    for offset in range(len(subnets)):
        subnet = subnets[(seed + offset) % len(subnets)]
        if not any(subnet.overlaps(network) for network in in_use):
            return subnet
    raise NetnsUnavailable("no free /30 left in 169.254.0.0/16")


@contextmanager
def slow_link(*, rate_kbit: int, limit_bytes: int = 4_000_000) -> Iterator[SlowLink]:
    """A namespace reachable over a ``rate_kbit`` link that queues up to ``limit_bytes``.

    Raises:
        NetnsUnavailable: not root, or no ``ip``/``tc``, or the kernel refused a namespace.
    """
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsUnavailable("iproute2's ip and tc are not installed (Debian: iproute2)")
    if os.geteuid() != 0:
        raise NetnsUnavailable("creating a network namespace needs root")
    pid = os.getpid()
    namespace = f"ms-slow-{pid}"
    host_device, peer_device = f"msh{pid}", f"msn{pid}"  # at most 15 characters
    try:
        _run("ip", "netns", "add", namespace)
    except subprocess.CalledProcessError as exc:
        raise NetnsUnavailable(f"ip netns add was refused: {exc.stderr.strip()}") from None
    try:
        pair = f"{host_device} type veth peer name {peer_device} netns {namespace}"
        _run(*f"ip link add {pair}".split())
        subnet = _free_subnet(pid)
        host, peer = (str(address) for address in subnet.hosts())
        _run(*f"ip addr add {host}/30 dev {host_device}".split())
        _run(*f"ip link set {host_device} up".split())
        _run(*f"ip -n {namespace} addr add {peer}/30 dev {peer_device}".split())
        _run(*f"ip -n {namespace} link set {peer_device} up".split())
        _run(*f"ip -n {namespace} link set lo up".split())
        # Towards the namespace only: what the server sends is shaped, what the viewer sends
        # back (RTCP, STUN) is not. A big queue limit: packets wait (and stay charged to the
        # sending socket) instead of being dropped.
        shaper = f"rate {rate_kbit}kbit burst 4kb limit {limit_bytes}"
        _run(*f"tc qdisc add dev {host_device} root tbf {shaper}".split())
        yield SlowLink(namespace, host_device, host, peer, rate_kbit)
    finally:
        subprocess.run(["ip", "link", "del", host_device], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)
