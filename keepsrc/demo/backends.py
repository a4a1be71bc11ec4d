"""Backends that report the client address they saw, for `keepsrc demo`, tests and compose demos.

    python -m keepsrc.demo.backends tcp 127.0.0.1:9000     # echo a line, prefixed with the client seen
    python -m keepsrc.demo.backends http 127.0.0.1:8080    # answer GETs with JSON: peer + headers
"""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    peer: str  # the accept() peer address
    proxy_header: str | None = None  # a PROXY v1 line, or "v2 <src>" for v2
    data: bytes = b""


@dataclass
class TcpBackend:
    """Echoes each connection's first line, prefixed with `backend:<name> client:<ip> `, then
    closes; records what it saw.

    If a connection starts with a PROXY protocol header (v1 or v2), the header is parsed and
    stripped, so a test can check the address an upstream PROXY hop carried.
    """

    host: str = "127.0.0.1"
    port: int = 0
    name: str = "tcp"
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer[0]), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(5)
            try:
                # Read one line: a PROXY header and the payload may arrive in separate segments.
                buffer = b""
                while True:
                    chunk = conn.recv(65536)
                    buffer += chunk
                    header, data = parse_proxy_header(buffer)
                    if not chunk or b"\n" in data:
                        break
                record = Seen(peer=peer, proxy_header=header, data=data)
                self.seen.append(record)
                client = header.split()[2] if header and header.startswith("PROXY ") else peer
                if header and header.startswith("v2 "):
                    client = header.split()[1]
                conn.sendall(f"backend:{self.name} client:{client} ".encode() + data)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # drain to the client's close, so ours is not a reset
                    pass
            except OSError:
                return

    def close(self) -> None:
        self._sock.close()


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_proxy_header(data: bytes) -> tuple[str | None, bytes]:
    """Split a PROXY v1/v2 header from the payload. v2 is returned as 'v2 <src-ip> <dst-ip>'."""
    if data.startswith(b"PROXY "):
        line, _, rest = data.partition(b"\r\n")
        return line.decode(), rest
    if data.startswith(V2_SIGNATURE) and len(data) >= 16:
        length = int.from_bytes(data[14:16], "big")
        body, rest = data[16 : 16 + length], data[16 + length :]
        family = data[13] >> 4
        if family == 1 and len(body) >= 12:
            src, dst = socket.inet_ntop(socket.AF_INET, body[0:4]), socket.inet_ntop(socket.AF_INET, body[4:8])
            return f"v2 {src} {dst}", rest
        if family == 2 and len(body) >= 36:
            src, dst = socket.inet_ntop(socket.AF_INET6, body[0:16]), socket.inet_ntop(socket.AF_INET6, body[16:32])
            return f"v2 {src} {dst}", rest
        return "v2 LOCAL", rest
    return None, data


def proxy_v2_header(src: str, dst: str, src_port: int, dst_port: int) -> bytes:
    """A PROXY protocol v2 PROXY/TCP header, as a load balancer would send it."""
    if ":" in src:
        family, addresses = 0x21, socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    else:
        family, addresses = 0x11, socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst)
    body = addresses + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return V2_SIGNATURE + bytes([0x21, family]) + len(body).to_bytes(2, "big") + body


class _EchoHeaders(http.server.BaseHTTPRequestHandler):
    server: _HttpServer

    def do_GET(self) -> None:
        body = json.dumps(
            {"backend": self.server.name, "peer": self.client_address[0], "headers": dict(self.headers.items())}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    name = "http"


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class HttpBackend:
    """Answers every GET with JSON: its name, the accept() peer, and the request headers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str = "http") -> None:
        server_class = _HttpServer6 if ":" in host else _HttpServer
        self._server = server_class((host, port), _EchoHeaders)
        self._server.name = name
        self.host, self.port = host, self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m keepsrc.demo.backends")
    parser.add_argument("kind", choices=["tcp", "http"])
    parser.add_argument("address", help="HOST:PORT to listen on")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    host = host.strip("[]")
    if args.kind == "tcp":
        TcpBackend(host, int(port), args.name)
    else:
        HttpBackend(host, int(port), args.name)
    print(f"{args.kind} backend {args.name} listening on {args.address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
