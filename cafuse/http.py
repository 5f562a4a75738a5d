"""A lean HTTP/1.1 client on trio and h11, for fetching chunks and indexes.

Why not httpx: on trio, httpx's per-request overhead caps a client at about
1.2k requests/s on this kind of machine, about 80 MB/s with 64 KiB chunks;
h11 driven directly manages 4-6k (perf-anchors.md of the design notes).
This module keeps only what chunk fetching needs: GET, keep-alive
connections per origin, TLS, extra headers, a bounded body size.
"""

import math
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from .errors import CafuseError
from .slots import Priority, Slots

_READ_SIZE = 256 * 1024


class HTTPError(CafuseError):
    """A request that failed; ``retryable`` tells whether trying again (on
    this server, later) may help.  One that got no answer in time tells
    when that try ``began`` (trio's clock)."""

    def __init__(self, message: str, retryable: bool, began: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.began = began

    @property
    def timed_out(self) -> bool:
        return self.began is not None


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings: a CA bundle, a client certificate, or no checks at all."""
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise CafuseError(f"{self.ca_file}: not a CA bundle: {_tls_reason(e)}") from None
        if self.client_cert:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as e:
                files = " or ".join(filter(None, (self.client_cert, self.client_key)))
                raise CafuseError(f"{files}: not a client certificate and key: "
                                  f"{_tls_reason(e)}") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class _Connection:
    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False

    async def get(self, host: str, target: str, headers, max_body: int) -> Response:
        request = h11.Request(method="GET", target=target,
                              headers=[("Host", host), *headers])
        # One write for the head and the (empty) end of the message.
        await self.stream.send_all(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))
        response = await self._next_event()
        if not isinstance(response, h11.Response):
            raise HTTPError(f"unexpected reply {type(response).__name__}", True)
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise HTTPError(f"response body larger than {max_body} bytes", False)
            elif isinstance(event, h11.EndOfMessage):
                break
        return Response(response.status_code, response.headers, bytes(body))

    def reusable(self) -> bool:
        # Bytes after the response are no next response: never reuse then.
        if (self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                and not self.h11.trailing_data[0]):
            self.h11.start_next_cycle()
            self.reused = True
            return True
        return False

    async def _next_event(self):
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_READ_SIZE)
                if not data and self.h11.their_state is h11.SEND_RESPONSE:
                    raise _Closed()  # closed before answering: an idle connection timed out
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed()
            return event

    async def aclose(self):
        await self.stream.aclose()


class _Closed(Exception):
    """The server closed the connection before a full response."""


class Client:
    """GET requests to one origin over a pool of keep-alive connections.

    ``max_connections`` bounds the connections, and so the requests in
    flight.  A request on a reused connection that the server had already
    closed is retried once on a fresh one; any other failure raises
    HTTPError.
    """

    def __init__(self, base_url: str, max_connections: int = 8,
                 headers: dict[str, str] | None = None,
                 tls: TLSOptions | None = None, max_body: int = 256 << 20):
        try:
            parts = urlsplit(base_url)
            port = parts.port
        except ValueError as e:  # a bad IPv6 literal, a port out of range
            raise CafuseError(f"{base_url}: not a valid URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CafuseError(f"{base_url}: not an http(s) URL")
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.base_path = parts.path.rstrip("/")
        self.headers = [("User-Agent", "cafuse"), *(headers or {}).items()]
        self.max_body = max_body
        self._tls = (tls or TLSOptions()).context() if self.scheme == "https" else None
        self._idle: list[_Connection] = []
        # Places among the requests in flight, urgent requests first; a
        # caller that tries a request again keeps its place (get_in_slot).
        self.slots = Slots(max_connections)

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}/{path}"

    async def get(self, path: str, timeout: float = math.inf,
                  priority: Priority | None = None) -> Response:
        """GET ``<base>/<path>``; any status is returned, transport trouble
        raises HTTPError.  ``timeout`` bounds the request from the moment
        it has a place among the requests in flight: the wait for one is
        not counted, as hundreds of queued chunk requests on a slow link
        are no sign of trouble.  Urgent by default."""
        async with self.slots.hold(priority or Priority()):
            return await self.get_in_slot(path, timeout)

    async def get_in_slot(self, path: str, timeout: float = math.inf) -> Response:
        """``get`` for a caller that holds a place in ``slots``."""
        began = trio.current_time()
        with trio.move_on_after(timeout):
            return await self._get(path, f"{self.base_path}/{path}")
        raise HTTPError(f"{self.url(path)}: no answer within {timeout:g} s", True, began)

    async def _get(self, path: str, target: str) -> Response:
        for attempt in range(2):
            # After a stale idle connection, the others are likely stale too.
            conn = self._idle.pop() if self._idle and not attempt else await self._connect()
            try:
                response = await conn.get(self.host_header, target,
                                          self.headers, self.max_body)
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError, h11.ProtocolError) as e:
                await _close_quietly(conn)
                if conn.reused and isinstance(e, (_Closed, trio.BrokenResourceError)):
                    continue  # a stale keep-alive connection: try a fresh one
                raise HTTPError(f"{self.url(path)}: {_describe(e)}", True) from None
            except BaseException:
                await _close_quietly(conn)
                raise
            if conn.reusable():
                self._idle.append(conn)
            else:
                await _close_quietly(conn)
            return response
        raise HTTPError(f"{self.url(path)}: connection closed by the server", True)

    async def _connect(self) -> _Connection:
        try:
            if self._tls is not None:
                stream = await trio.open_ssl_over_tcp_stream(
                    self.hostname, self.port, ssl_context=self._tls)
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
            else:
                stream = await trio.open_tcp_stream(self.hostname, self.port)
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            # A certificate that fails verification will fail again.
            retryable = not isinstance(e.__cause__ or e, ssl.SSLCertVerificationError)
            raise HTTPError(f"{self.scheme}://{self.host_header}: cannot connect: "
                            f"{_describe(e)}", retryable) from None
        return _Connection(stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_quietly(conn)


async def _close_quietly(conn):
    with trio.CancelScope(shield=True):
        try:
            await conn.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _tls_reason(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason.replace("_", " ").lower() if error.reason else "not PEM"
    return error.strerror or str(error)


def _describe(error: BaseException) -> str:
    if isinstance(error, trio.BrokenResourceError) and error.__cause__ is not None:
        return _describe(error.__cause__)
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {error.verify_message}"
    if isinstance(error, _Closed):
        return "connection closed before the response was complete"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
