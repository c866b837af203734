"""A stalled uplink: a localhost HTTP proxy between one agent and the SuperLink.

Flower 1.41's SuperNode talks to the SuperLink in plain HTTP/1.1 requests
(protobuf bodies with a Content-Length; `--insecure` here). The proxy passes
every byte through, except that while ``hold(fragment)`` is on, a request whose
request line contains ``fragment`` (e.g. "/v1/fleet/push-messages": the agent
sending its reply) is kept back: the agent waits, times out after 30 s, retries,
and the retry is kept back too — a link that stalls for one kind of request
while heartbeats still pass. ``release()`` lets the waiting request through
(requests whose agent already gave up on them are dropped, never replayed).

Threads in the test process, 127.0.0.1 only; ``close()`` ends them.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from runtime.flower_processes import LOCALHOST


class HttpHoldProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCALHOST, 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._held_fragment: str | None = None
        self._released = threading.Event()
        self._released.set()
        self._closed = False
        self.held = 0        # requests kept back (including ones the agent gave up on)
        self.forwarded = 0   # held requests let through on release
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, fragment: str) -> None:
        self._held_fragment = fragment
        self._released.clear()

    def release(self) -> None:
        self._held_fragment = None
        self._released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        self._listener.close()

    # ---- plumbing ----
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((LOCALHOST, self.upstream_port), timeout=5)
        except OSError:
            client.close()  # SuperLink down: the agent sees a refused connection and retries
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        buffer = b""
        try:
            while True:
                request, buffer = self._read_request(client, buffer)
                if request is None:
                    return
                line = request.split(b"\r\n", 1)[0].decode("latin-1")
                fragment = self._held_fragment
                if fragment and fragment in line:
                    self.held += 1
                    while not self._released.wait(0.2):
                        if _closed_by_peer(client):
                            return  # the agent gave up on this one (timeout): never replay it
                    if _closed_by_peer(client):
                        return
                    self.forwarded += 1
                upstream.sendall(request)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    @staticmethod
    def _read_request(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        """One HTTP/1.1 request (headers + Content-Length body) from ``sock``."""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for header in head.split(b"\r\n")[1:]:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def wait_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))
