"""HTTP servers the tests start on 127.0.0.1 and stop: nginx serving a
directory, and a small server of our own that injects faults."""

import contextlib
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {access_log};
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_requests 100000;
    sendfile on;
    server {{
        listen 127.0.0.1:{port}{ssl};
        root {root};
        {certs}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Nginx:
    """nginx serving ``root`` at ``self.url``; a context manager.  With
    ``tls=(cert, key)`` it serves HTTPS."""

    def __init__(self, root: Path, work: Path, tls: tuple[Path, Path] | None = None,
                 log_requests: bool = False):
        self.root, self.work, self.tls = root, work, tls
        self.access_log = work / "access.log" if log_requests else None
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self):
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        certs = (f"ssl_certificate {self.tls[0]}; ssl_certificate_key {self.tls[1]};"
                 if self.tls else "")
        conf.write_text(NGINX_CONF.format(work=self.work, port=self.port, root=self.root,
                                          ssl=" ssl" if self.tls else "", certs=certs,
                                          access_log=self.access_log or "off"))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.work),
                                      "-e", str(self.work / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode()}")
        return self

    def chunk_requests(self) -> int:
        """Chunk GETs so far (needs ``log_requests``)."""
        return sum(".cacnk" in line for line in self.access_log.read_text().splitlines())

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FaultServer:
    """Serves files below ``root`` like nginx, but each request can be made
    to fail.  ``fault(path, count)`` picks the fault for a request: one of
    None (serve it), "404", "500", "503", "429", "stall", "reset",
    "truncate", "corrupt", "trickle", "hints" (a 103 before the answer),
    "huge" (5 GB announced, zeros sent until the client goes), or "301",
    "302", "307", "308": a redirect to ``/moved`` + the path, which serves
    the same file.  ``requests`` counts requests per path.
    """

    def __init__(self, root: Path, fault=lambda path, count: None):
        self.root = root
        self.fault = fault
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def handle(self, h):
        path = h.path.split("?")[0]
        with self.lock:
            count = self.requests[path] = self.requests.get(path, 0) + 1
        fault = self.fault(path, count)
        file = self.root / path.removeprefix("/moved").lstrip("/")
        if fault in ("301", "302", "307", "308"):
            h.send_response(int(fault))
            h.send_header("Location", "/moved" + h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if fault == "huge":
            h.send_response(200)
            h.send_header("Content-Length", str(5 * 10**9))
            h.end_headers()
            with contextlib.suppress(OSError):
                while not self.stop.is_set():
                    h.wfile.write(bytes(1 << 20))
            h.close_connection = True
            return
        if fault == "hints":
            h.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        if fault in ("404", "500", "503", "429") or (fault is None and not file.is_file()):
            status = int(fault) if fault else 404
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = file.read_bytes()
        if fault == "stall":
            self.stop.wait(60)
            h.close_connection = True
            return
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.close_connection = True
            return
        if fault == "corrupt":
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0xFF]) + \
                body[len(body) // 2 + 1:]
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if fault == "truncate":
            h.wfile.write(body[:len(body) // 2])
            h.close_connection = True
            return
        if fault == "trickle":
            for k in range(len(body)):
                if self.stop.wait(0.05):
                    break
                h.wfile.write(body[k:k + 1])
                h.wfile.flush()
            return
        h.wfile.write(body)


class _Server(ThreadingHTTPServer):
    # socketserver's listen backlog of 5 drops the SYNs of a client that
    # opens 16 connections at once: each then waits a second to resend,
    # longer than the short timeouts the fault tests use.
    request_queue_size = 128


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def dead_url() -> str:
    """A URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def kill_quietly(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def environ(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env
