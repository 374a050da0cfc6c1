"""A network namespace joined to this host by a veth pair, whose link a test can cut for real.

A relay run inside the namespace (``ip netns exec``) reaches the host only through the veth
pair. ``cut()`` puts a ``blackhole`` queueing discipline on both ends: every packet, ARP
included, is dropped in silence, in both directions, and the sender is told it went out. That is
what a partition looks like to TCP (nothing refused, nothing reset: retransmissions into the
void), unlike ``ip link set down``, which the kernel reports to local senders. ``heal()`` removes
it. (``netem loss 100%`` would do the same, but the kernels this runs on need not have netem;
``blackhole`` is part of the scheduler core.)

The machine's PostgreSQL listens on 127.0.0.1 only, which a namespace cannot reach, so a
``TcpForwarder`` on the host end of the veth relays each connection to it. PostgreSQL then sees
the forwarder, which stays connected through a partition: like a real server, it learns nothing
of the cut until the relay's side closes or resets its connection.

Names and the /30 subnet are random per instance, so parallel test runs do not collide;
``close()`` removes the namespace (and with it the veth pair) and is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence


def unusable_reason() -> str | None:
    """Why this machine cannot run a namespace test, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"obxp{uuid.uuid4().hex[:8]}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A random 10.x.y.z/30 that overlaps no network of this host's interfaces."""
    listed = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    taken = [  # "2: eth0    inet 10.0.0.5/24 brd ..." per address
        ipaddress.IPv4Interface(line.split("inet ", 1)[1].split()[0]).network
        for line in listed.splitlines()
        if "inet " in line
    ]
    for _ in range(100):
        net = ipaddress.IPv4Network(
            (f"10.{rng.randrange(200, 255)}.{rng.randrange(256)}.{rng.randrange(64) * 4}", 30)
        )
        if not any(net.overlaps(other) for other in taken):
            return net
    raise RuntimeError("no free 10.x.y.z/30 subnet found")


def _mac(show: list[str]) -> str:
    """The MAC address in ``ip link show``'s output."""
    out = subprocess.run(show, capture_output=True, text=True, check=True).stdout
    return out.split("link/ether", 1)[1].split()[0]


class Namespace:
    """A namespace ``name`` with ``ns_ip`` inside, joined to ``host_ip`` on this host."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name = f"outbox-{tag}"
        self.host_dev = f"obxh{tag}"  # interface names: 15 characters at most
        self.ns_dev = f"obxn{tag}"
        net = _free_subnet(random.Random())
        host, inside = list(net.hosts())
        self.host_ip, self.ns_ip = str(host), str(inside)
        self.is_cut = False
        self._created = False
        try:
            _run("ip", "netns", "add", self.name)
            self._created = True
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev,
                 "netns", self.name)  # fmt: skip
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            _run("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
            _run("ip", "-n", self.name, "link", "set", self.ns_dev, "up")
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            # Each end knows the other's MAC for good: a cut then drops IP packets only, as a
            # partition beyond this link would, instead of also failing ARP (which the kernel
            # reports to connecting sockets as "no route to host" within a few seconds).
            host_mac = _mac(["ip", "link", "show", self.host_dev])
            ns_mac = _mac(["ip", "-n", self.name, "link", "show", self.ns_dev])
            _run("ip", "neigh", "replace", self.ns_ip, "lladdr", ns_mac, "dev", self.host_dev,
                 "nud", "permanent")  # fmt: skip
            _run("ip", "-n", self.name, "neigh", "replace", self.host_ip, "lladdr", host_mac,
                 "dev", self.ns_dev, "nud", "permanent")  # fmt: skip
        except BaseException:
            self.close()
            raise

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *args]

    def cut(self) -> None:
        """Drop every packet on the link, both ways, silently."""
        _run("tc", "qdisc", "replace", "dev", self.host_dev, "root", "blackhole")
        _run("tc", "-n", self.name, "qdisc", "replace", "dev", self.ns_dev, "root", "blackhole")
        self.is_cut = True

    def heal(self) -> None:
        _run("tc", "qdisc", "del", "dev", self.host_dev, "root")
        _run("tc", "-n", self.name, "qdisc", "del", "dev", self.ns_dev, "root")
        self.is_cut = False

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in listed.stdout.split()]

    def close(self) -> None:
        """Kill what still runs inside (only this test's processes can be in this namespace),
        then delete the namespace; its veth end goes with it, and so does the pair."""
        if not self._created:
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)  # if left
        self._created = False


class TcpForwarder:
    """Accept on ``(host, port)`` and relay each connection to ``target`` (a TCP address, or the
    path of a Unix socket: the embedded PostgreSQL of ``make test`` listens on one), on an event
    loop of its own in a thread. A connection's two halves close together, as soon as one side
    ends."""

    def __init__(self, host: str, target: tuple[str, int] | str) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, host, 0), self._loop
        ).result(10)
        self.host = host
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._writers: set[asyncio.StreamWriter] = set()
        # (unix time, peer, which side ended first and how): what a failing test prints.
        self.events: list[tuple[float, str, str]] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self._target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self._target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer), name="client"),
                asyncio.create_task(self._pipe(up_reader, writer), name="server"),
            ]
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            peer = str(writer.get_extra_info("peername"))
            for task in done:
                self.events.append((time.time(), peer, f"{task.get_name()}: {task.result()}"))
            for task in pipes:
                task.cancel()
        finally:
            for w in pair:
                w.transport.abort()
            self._writers -= pair

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Copy until end of file (or an error); says which."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "end of file"

    def close(self) -> None:
        async def _close() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
