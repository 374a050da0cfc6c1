"""A fast SMTP sink in a process of its own: answers 250 to everything and records each mail.

Why not ``web.capture.CaptureServer``: that is aiosmtpd in a thread of the caller, sharing its
GIL, and it parses every mail. This sink is a bare ``asyncio.Protocol`` (no StreamReader, no
parsing beyond finding the end of DATA and the Message-ID header) in a separate process, so it
costs a fraction of what the clients it measures cost; ``bench.smtpload.blast`` measures how many
mails a second it can take, to show it is not what bounds a figure.

For each accepted mail it records the wall-clock time of the 250 reply and the Message-ID, so
throughput (10-90 % window of acceptance times) and end-to-end latency (acceptance minus the
producer's commit time, matched by Message-ID) come from the same place for every system.
``delay`` makes it a slow mail server (item 1: one second per message, concurrently).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import socket
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any, cast

_EHLO = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n"


class _State:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.times = array("d")
        self.ids: list[bytes] = []
        self.record_ids = True

    def accept(self, data: bytes) -> None:
        self.times.append(time.time())
        if self.record_ids:
            i = data.find(b"Message-ID:")
            if i < 0:
                i = data.find(b"Message-Id:")
            if i >= 0:
                j = data.find(b"\r\n", i)
                self.ids.append(data[i + 11 : j].strip())
            else:
                self.ids.append(b"")


class _SmtpSink(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.pending = 0  # replies held back by a delay: keep their order

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport
        self.transport.write(b"220 sink ESMTP ready\r\n")

    def _reply(self, line: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while self.buf:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    if self.buf == b".\r\n" or self.buf.startswith(b".\r\n"):
                        end = -2  # empty body
                    else:
                        break
                body = self.buf[: max(end, 0)]
                self.buf = self.buf[end + 5 :] if end >= 0 else self.buf[3:]
                self.in_data = False
                if self.state.delay:
                    if out:
                        self._reply(b"".join(out))
                        out = []
                    self.loop.call_later(self.state.delay, self._accept_later, body)
                    self.pending += 1
                else:
                    self.state.accept(body)
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(_EHLO)
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                out.append(b"221 Bye\r\n")
                self._reply(b"".join(out))
                if self.transport is not None:  # always, once connection_made has run
                    self.transport.close()
                return
            else:  # HELO MAIL RCPT RSET NOOP: all fine
                out.append(b"250 OK\r\n")
        if out:
            self._reply(b"".join(out))

    def _accept_later(self, body: bytes) -> None:
        self.pending -= 1
        self.state.accept(body)
        self._reply(b"250 2.0.0 Ok: queued\r\n")


def _serve(sock: socket.socket, delay: float, control: Connection) -> None:
    async def main() -> None:
        state = _State(delay)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SmtpSink(state), sock=sock, backlog=1024)
        done = asyncio.Event()

        def on_command() -> None:
            try:
                cmd, arg = control.recv()
            except EOFError:
                done.set()
                return
            if cmd == "count":
                control.send(len(state.times))
            elif cmd == "reset":
                state.times = array("d")
                state.ids = []
                control.send(True)
            elif cmd == "delay":
                state.delay = float(arg)
                control.send(True)
            elif cmd == "records":
                control.send((state.times.tobytes(), state.ids))
            elif cmd == "cpu":
                r = resource.getrusage(resource.RUSAGE_SELF)
                control.send(r.ru_utime + r.ru_stime)
            elif cmd == "stop":
                control.send(True)
                done.set()

        loop.add_reader(control.fileno(), on_command)
        control.send(("ready", os.getpid()))
        await done.wait()
        server.close()

    asyncio.run(main())


class Sink:
    """The parent's handle: ``with Sink() as sink: ... sink.url ... sink.count()``."""

    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.delay = delay
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(1024)
        self.port: int = self._sock.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        self._control, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(self._sock, delay, child), daemon=True, name="bench-sink"
        )
        self.pid = 0

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> Sink:
        self._proc.start()
        msg = self._control.recv()
        assert msg[0] == "ready"
        self.pid = msg[1]
        self._sock.close()  # the child has its own copy
        return self

    def _ask(self, cmd: str, arg: object = None) -> Any:
        self._control.send((cmd, arg))
        return self._control.recv()

    def count(self) -> int:
        return int(self._ask("count"))

    def reset(self) -> None:
        self._ask("reset")

    def set_delay(self, seconds: float) -> None:
        self._ask("delay", seconds)

    def records(self) -> tuple[list[float], list[bytes]]:
        raw, ids = self._ask("records")
        times = array("d")
        times.frombytes(raw)
        return list(times), ids

    def cpu_seconds(self) -> float:
        return float(self._ask("cpu"))

    def wait_count(self, n: int, timeout: float, every: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(every)
        return False

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._ask("stop")
            except (OSError, EOFError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
