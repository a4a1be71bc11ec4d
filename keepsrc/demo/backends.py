"""Backends that report the client address they saw, for `keepsrc demo`, tests and compose demos.

    python -m keepsrc.demo.backends tcp 127.0.0.1:9000     # echo a line, prefixed with the client seen
    python -m keepsrc.demo.backends http 127.0.0.1:8080    # answer GETs with JSON: peer + headers
    python -m keepsrc.demo.backends udp 127.0.0.1:5070     # answer datagrams (SIP too) with the source seen
    python -m keepsrc.demo.backends tls 127.0.0.1:9443 --cert c.pem --key c.key   # TlsBackend: PROXY header, TLS
    python -m keepsrc.demo.backends sip-options 198.18.4.2:5060   # a client: one OPTIONS, print the answer
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Seen:
    peer: str  # the accept() peer address (udp: the datagram's source address)
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
        self._sock, self.port = _serve_connections(self.host, self.port, self._handle)

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
                self.seen.append(Seen(peer=peer, proxy_header=header, data=data))
                conn.sendall(f"backend:{self.name} client:{_client(header, peer)} ".encode() + data)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # drain to the client's close, so ours is not a reset
                    pass
            except OSError:
                return

    def close(self) -> None:
        self._sock.close()


def tcp_first_word(port: int, timeout: float = 3) -> str:
    """A line sent to 127.0.0.1:`port`, and the first word of what comes back: the answering
    TcpBackend's 'backend:NAME' through any proxies on the way ('' if nothing came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"hello\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply.decode().split()[0] if reply else ""


@dataclass
class TlsBackend:
    """A TLS server that reads an optional PROXY header in the clear, then the handshake, then echoes
    one line as `backend:<name> client:<ip> sni:<name> ` + line: what an SNI-passthrough or a
    TLS-upstream hop delivered. `cert`/`key`: PEM files."""

    cert: str
    key: str
    host: str = "127.0.0.1"
    port: int = 0
    name: str = "tls"
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert, self.key)
        self._sni: dict[int, str] = {}
        self._context.sni_callback = lambda sock, name, _: self._sni.__setitem__(id(sock), name or "") or None
        self._sock, self.port = _serve_connections(self.host, self.port, self._handle)

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(5)
            try:
                header = read_proxy_header(conn)
                with self._context.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\n" not in data and (chunk := tls.recv(65536)):
                        data += chunk
                    self.seen.append(Seen(peer=peer, proxy_header=header, data=data))
                    sni = self._sni.pop(id(tls), "")
                    tls.sendall(f"backend:{self.name} client:{_client(header, peer)} sni:{sni} ".encode() + data)
            except (OSError, ssl.SSLError):
                return

    def close(self) -> None:
        self._sock.close()


def _serve_connections(host: str, port: int,
                       handle: Callable[[socket.socket, str], None]) -> tuple[socket.socket, int]:
    """Listen on host:port (0: any free port) and `handle(conn, peer_ip)` each connection on a
    thread of its own; the listening socket (close it to stop) and the port bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)

    def accept() -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn, peer[0]), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return sock, sock.getsockname()[1]


def _client(header: str | None, peer: str) -> str:
    """The client a PROXY header names (v1 "PROXY TCP4 <src> ...", v2 "v2 <src>"), else the TCP peer."""
    if header and header.startswith("PROXY "):
        return header.split()[2]
    if header and header.startswith("v2 "):
        return header.split()[1]
    return peer


def read_proxy_header(conn: socket.socket) -> str | None:
    """Consumes a PROXY v1/v2 header from `conn`, if the connection starts with one, and nothing
    after it (what follows may be a TLS ClientHello, which must stay for the handshake)."""
    # Both a PROXY header and a ClientHello are longer than 16 bytes: wait for that many.
    start = conn.recv(16, socket.MSG_PEEK | socket.MSG_WAITALL)
    if start.startswith(V2_SIGNATURE) and len(start) >= 16:
        header = _recv_exactly(conn, 16 + int.from_bytes(start[14:16], "big"))
        return parse_proxy_header(header)[0]
    if start.startswith(b"PROXY "):
        line = conn.recv(108, socket.MSG_PEEK)
        return parse_proxy_header(_recv_exactly(conn, line.index(b"\r\n") + 2))[0]
    return None


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed inside a PROXY header")
        data += chunk
    return data


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


_SIP_REQUEST = re.compile(rb"^[A-Z]+ sips?:\S+ SIP/2\.0\r\n")


@dataclass
class UdpBackend:
    """Answers every datagram to the address it came from, saying which source it saw; records it.

    A SIP request (e.g. an OPTIONS keepalive) gets a SIP `200 OK` whose top Via carries
    `received=<ip>;rport=<port>`, which is how SIP reports the source a server saw (RFC 3581);
    anything else gets `backend:<name> client:<ip>:<port> ` followed by the datagram. With `log`,
    one `peer <ip> <port>` line per datagram, for a test to read when the answer cannot arrive.
    """

    host: str = "127.0.0.1"
    port: int = 0
    name: str = "udp"
    log: TextIO | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(65535)
            except OSError:
                return
            self.seen.append(Seen(peer=peer[0], data=data))
            if self.log is not None:
                self.log.write(f"peer {peer[0]} {peer[1]}\n")
                self.log.flush()
            try:
                self._sock.sendto(self._answer(data, peer[0], peer[1]), peer[:2])
            except OSError:
                # The route back to that source is refused here (e.g. a 127/8 source towards a
                # remote address without route_localnet): the client simply gets no answer.
                continue

    def _answer(self, data: bytes, ip: str, port: int) -> bytes:
        if not _SIP_REQUEST.match(data):
            client = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            return f"backend:{self.name} client:{client} ".encode() + data
        head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
        headers = [line for line in head[1:] if line.split(":", 1)[0].strip().lower()
                   in ("via", "from", "to", "call-id", "cseq")]
        for i, line in enumerate(headers):
            if line.lower().startswith("via:"):  # only the top Via: it is the hop that sent to us
                sent_by = line.replace(";rport", "")
                headers[i] = f"{sent_by};received={ip};rport={port}"
                break
        lines = ["SIP/2.0 200 OK", *headers, f"Server: keepsrc-demo {self.name}", "Content-Length: 0"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def close(self) -> None:
        self._sock.close()


def sip_options(target: str, local: tuple[str, int]) -> bytes:
    """A minimal valid SIP OPTIONS request (RFC 3261 section 11), as a trunk sends to check the
    other side is alive; `local` is the sender's own address, for its Via and From."""
    host = f"[{local[0]}]" if ":" in local[0] else local[0]
    token = uuid.uuid4().hex[:16]
    lines = [
        f"OPTIONS sip:{target} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:{local[1]};branch=z9hG4bK{token};rport",
        "Max-Forwards: 70",
        f"From: <sip:keepsrc@{host}>;tag={token[:8]}",
        f"To: <sip:{target}>",
        f"Call-ID: {token}@{host}",
        "CSeq: 1 OPTIONS",
        "Accept: application/sdp",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sip_ask(host: str, port: int, timeout: float = 6.0) -> bytes | None:
    """Send one OPTIONS to host:port and return the first answer, or None by `timeout`.

    Retransmits as a SIP client does over UDP (RFC 3261 timer E: 0.5s, doubling up to 4s), so an
    exchange that stalls while a fresh path warms up (seen with IPv6 through new namespaces)
    still gets its answer. The socket is connected: only an answer from host:port counts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = sip_options(target, sock.getsockname()[:2])
        deadline = time.monotonic() + timeout
        interval = 0.5
        while (left := deadline - time.monotonic()) > 0:
            try:
                sock.send(request)
                sock.settimeout(min(interval, left))
                return sock.recv(65535)
            except TimeoutError:
                interval = min(interval * 2, 4.0)
            except OSError:  # ICMP port unreachable for an earlier send: nothing listens yet
                time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
    return None


def seen_source(answer: bytes) -> str | None:
    """The source IP a UdpBackend reports in its answer (SIP `received=`, or `client:`)."""
    text = answer.decode(errors="replace")
    match = re.search(r"^Via:[^\r\n]*;received=([^;\s]+)", text, re.MULTILINE | re.IGNORECASE)
    if match:
        return match.group(1)
    match = re.match(r"backend:\S+ client:(\[[^\]]+\]|[^:\s]+)", text)
    return match.group(1).strip("[]") if match else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keepsrc.demo.backends")
    parser.add_argument("kind", choices=["tcp", "http", "udp", "tls", "sip-options"])
    parser.add_argument("address", help="HOST:PORT to listen on (sip-options: to send to)")
    parser.add_argument("--name", default="backend")
    parser.add_argument("--timeout", type=float, default=6.0, help="sip-options: give up after this many seconds")
    parser.add_argument("--cert", help="tls: the PEM certificate to serve")
    parser.add_argument("--key", help="tls: its PEM private key")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    host = host.strip("[]")
    if args.kind == "sip-options":
        # Prints the answer, or nothing and exits 1 when none came.
        answer = sip_ask(host, int(port), args.timeout)
        sys.stdout.write(answer.decode(errors="replace") if answer is not None else "")
        return 0 if answer is not None else 1
    if args.kind == "tcp":
        TcpBackend(host, int(port), args.name)
    elif args.kind == "udp":
        UdpBackend(host, int(port), args.name, log=sys.stdout)
    elif args.kind == "tls":
        if not (args.cert and args.key):
            parser.error("tls needs --cert and --key")
        TlsBackend(args.cert, args.key, host, int(port), args.name)
    else:
        HttpBackend(host, int(port), args.name)
    print(f"{args.kind} backend {args.name} listening on {args.address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
