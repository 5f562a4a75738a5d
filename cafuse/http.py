"""A lean HTTP/1.1 client on trio and h11, for fetching chunks and indexes.

Why not httpx: on trio, httpx's per-request overhead caps a client at about
1.2k requests/s on this kind of machine, about 80 MB/s with 64 KiB chunks;
h11 driven directly manages 4-6k (perf-anchors.md of the design notes).
This module keeps only what chunk fetching needs: GET, keep-alive
connections per origin, TLS, extra headers, redirects, a bounded body size.
"""

import base64
import math
import re
import select
import ssl
from dataclasses import dataclass
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes, urljoin, urlsplit

import h11
import trio

from .errors import CafuseError
from .slots import Priority, Slots

_READ_SIZE = 256 * 1024
# Followed as casync's HTTP helper does (curl's FOLLOWLOCATION): a store
# moved to https, behind a CDN, or answering with signed URLs.  We only GET,
# so 303 changes nothing (RFC 9110 §15.4).
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_ORIGINS = 8   # other origins a client keeps connections to, for redirects
# What stays as it is in a request target; anything else (a space, a byte
# of UTF-8) is percent-encoded, as curl does (RFC 3986 §2.1).
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
# An answer's head, at most (h11 checks it while the head is incomplete):
# its default of 16 KiB is less than some CDNs send (cookies, policies).
MAX_HEAD = 64 * 1024


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


class _Progress:
    """How far a request got, for the message if it times out, and the URL
    it is at (redirects move it)."""

    def __init__(self, url: str):
        self.begin(url)

    def begin(self, url: str) -> None:
        """A new request, to ``url``."""
        self.url = url
        self.length: int | None = None   # the body's, once the head is in
        self.got = -1                    # body bytes in; -1 before the head

    def timed_out(self, timeout: float) -> str:
        if self.got < 0:
            return f"no answer within {timeout:g} s"
        of = "" if self.length is None else f" of {self.length}"
        return f"answer incomplete after {timeout:g} s ({self.got}{of} bytes)"


class _Unwanted(Exception):
    """An answer that cannot be what was asked for."""


class _TooLarge(_Unwanted):
    """A body (announced or received) larger than the client takes."""


def _cut(response: h11.Response, why: str) -> Response:
    """The answer whose body is too large to take: refused if it is the
    object asked for; an error's body is not needed (its connection is not
    reused, as the rest of the body is still to come)."""
    if 200 <= response.status_code < 300:
        raise _TooLarge(why)
    return Response(response.status_code, response.headers, b"")


class _Connection:
    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.reused = False
        self._poller = select.poll()  # for ``quiet``
        socket = getattr(stream, "transport_stream", stream).socket
        self._poller.register(socket.fileno(), select.POLLIN)

    async def get(self, target: str, headers, max_body: int, progress: _Progress) -> Response:
        request = h11.Request(method="GET", target=quote(target, safe=_URL_SAFE),
                              headers=headers)
        # One write for the head and the (empty) end of the message.
        await self.stream.send_all(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))
        response = await self._next_event()
        while isinstance(response, h11.InformationalResponse):  # 1xx: the answer follows
            response = await self._next_event()
        coding = (_header(response, b"content-encoding") or b"identity").strip().lower()
        if coding != b"identity" and 200 <= response.status_code < 300:
            raise _Unwanted(f"in the content coding {coding.decode('latin-1')}, "
                            f"not as it is (identity)")
        progress.length, progress.got = _content_length(response), 0
        if progress.length is not None and progress.length > max_body:
            return _cut(response, f"announces {progress.length} bytes; at most "
                        f"{max_body} are taken")
        parts = []
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                progress.got += len(event.data)
                if progress.got > max_body:
                    return _cut(response, f"goes on past {max_body} bytes, "
                                f"the most that are taken")
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        return Response(response.status_code, response.headers, b"".join(parts))

    def reusable(self) -> bool:
        # Bytes after the response are no next response: never reuse then.
        if (self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
                and not self.h11.trailing_data[0]):
            self.h11.start_next_cycle()
            self.reused = True
            return True
        return False

    def quiet(self) -> bool:
        """Nothing came while it was idle: no stray bytes a server sent after
        its response (which the next request would read as its answer), no
        close.  (A TLS stream's own buffer is not looked into.)"""
        return not self._poller.poll(0)

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
    closed (or broke) is retried once on a fresh one; any other failure
    raises HTTPError, and so does a body larger than ``max_body``.
    Redirects are followed, to other origins too, which get no extra
    ``headers`` (they may hold credentials for this one), nor ``auth``,
    the Authorization of the user and password of ``base_url`` (sent as
    Basic authentication, as curl does).  ``headers`` (a dict or pairs)
    replace the client's own of the same name, and a later one an earlier.
    """

    def __init__(self, base_url: str, max_connections: int = 8, headers=(),
                 tls: TLSOptions | None = None, max_body: int = 256 << 20,
                 auth: str | None = None):
        base_url, found = split_credentials(base_url)
        auth = auth or found
        try:
            parts = urlsplit(base_url)
            self.origin = _origin(parts)
        except ValueError as e:  # a bad IPv6 literal, a port out of range
            raise CafuseError(invalid_url(base_url, e)) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CafuseError(f"{base_url}: not an http(s) URL")
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        self.port = self.origin[2]
        self.host_header = parts.netloc
        self.base_path = parts.path.rstrip("/")
        # Without Accept-Encoding any coding is acceptable (RFC 9110 §12.5.3),
        # and a server may gzip what is already compressed.
        own = [("Host", self.host_header), ("User-Agent", "cafuse"),
               ("Accept-Encoding", "identity")]
        if auth is not None:
            own.append(("Authorization", auth))
        merged = {}
        for name, value in [*own, *dict(headers).items()]:
            merged[name.lower()] = (name, value.encode())  # as curl: UTF-8 as it is
        self.headers = list(merged.values())
        self.max_body = max_body
        self._tls_options = tls or TLSOptions()
        self._tls = self._tls_options.context() if self.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._elsewhere: dict[str, Client] = {}   # origin -> client, for redirects
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
        """``get`` for a caller that holds a place in ``slots``; redirects
        are followed within the same ``timeout``."""
        began = trio.current_time()
        progress = _Progress(self.url(path))
        with trio.move_on_after(timeout):
            response = await self._get(f"{self.base_path}/{path}", progress)
            hops = 0
            while (location := _location(response)) is not None:
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise HTTPError(f"{progress.url}: more than {MAX_REDIRECTS} redirects",
                                    False)
                response = await self._redirected(progress, location)
            return response
        raise HTTPError(f"{progress.url}: {progress.timed_out(timeout)}", True, began)

    async def _redirected(self, progress: _Progress, location: str) -> Response:
        """GET where ``location`` points from ``progress.url``, on this
        origin or another."""
        try:
            # Credentials in a Location are not used, as casync's curl does not.
            url = split_credentials(urljoin(progress.url, location))[0]
            parts = urlsplit(url)
            origin = _origin(parts)
        except ValueError as e:  # a bad IPv6 literal, a port out of range
            raise HTTPError(f"{progress.url}: redirected to "
                            f"{invalid_url(location, e)}", False) from None
        progress.begin(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if origin == self.origin:
            return await self._get(target, progress)
        key = f"{parts.scheme}://{parts.netloc}"
        client = self._elsewhere.get(key)
        if client is None:
            try:
                client = Client(key, tls=self._tls_options, max_body=self.max_body)
            except CafuseError:
                raise HTTPError(f"redirected to {url}: not an http(s) URL", False) from None
            if len(self._elsewhere) >= MAX_ORIGINS:  # used once
                try:
                    return await client._get(target, progress)
                finally:
                    await client.aclose()
            self._elsewhere[key] = client
        return await client._get(target, progress)

    async def _get(self, target: str, progress: _Progress) -> Response:
        for attempt in range(2):
            progress.begin(progress.url)
            # After a stale idle connection, the others are likely stale too.
            conn = await self._idle_connection() if not attempt else None
            conn = conn or await self._connect()
            try:
                response = await conn.get(target, self.headers, self.max_body, progress)
            except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError, h11.RemoteProtocolError) as e:
                await _close_quietly(conn)
                too_long = getattr(e, "error_status_hint", None) == 431  # the head: again
                if conn.reused and not too_long and isinstance(
                        e, (_Closed, trio.BrokenResourceError, h11.RemoteProtocolError)):
                    continue  # a stale keep-alive connection: try a fresh one
                raise HTTPError(f"{progress.url}: {_describe(e)}", not too_long) from None
            except h11.LocalProtocolError as e:  # the URL, not the server
                await _close_quietly(conn)
                raise HTTPError(f"{progress.url}: cannot be asked for: {e}", False) from None
            except _Unwanted as e:
                await _close_quietly(conn)
                raise HTTPError(f"{progress.url}: the answer {e}", False) from None
            except BaseException:
                await _close_quietly(conn)
                raise
            if conn.reusable():
                self._idle.append(conn)
            else:
                await _close_quietly(conn)
            return response
        raise HTTPError(f"{progress.url}: connection closed by the server", True)

    async def _idle_connection(self) -> _Connection | None:
        """A pooled connection that nothing came on while idle; the others
        are closed."""
        while self._idle:
            conn = self._idle.pop()
            if conn.quiet():
                return conn
            await _close_quietly(conn)
        return None

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
        elsewhere, self._elsewhere = self._elsewhere, {}
        for client in elsewhere.values():
            await client.aclose()


# scheme://, then the user and password: up to the authority's last "@"
# (RFC 3986 §3.2; one inside them is written %40).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without the user and password of its authority, and the
    Basic Authorization they make (None without them); percent-encoded
    bytes are sent as those bytes, as curl does."""
    found = _USERINFO.match(url)
    if found is None:
        return url, None
    user, _colon, password = found.group(2).partition(":")
    pair = unquote_to_bytes(user) + b":" + unquote_to_bytes(password)
    return found.group(1) + url[found.end():], "Basic " + base64.b64encode(pair).decode()


def shown(url: str) -> str:
    """``url`` without its user and password, for messages."""
    return split_credentials(url)[0]


def check_url(url: str) -> None:
    """Raise CafuseError if urlsplit refuses ``url`` (or its port), before
    anything cuts it where a bare '?', '#' or ';' of a password is."""
    try:
        urlsplit(url).port
    except ValueError as e:
        raise CafuseError(invalid_url(url, e)) from None


def invalid_url(url: str, error: ValueError) -> str:
    """The message for ``url``, which urlsplit refused.  One that still
    holds an "@" may have a password with a bare '/', '?' or '#' in it,
    which would show in what the URL or the error names: only its scheme
    is named then."""
    if "@" in url:
        return (f"{url.partition(':')[0]}: not a valid URL (a '/', '?', '#' or '@' in a "
                f"user or password is written %2F, %3F, %23, %40)")
    return f"{url}: not a valid URL ({error})"


def _origin(parts) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, as RFC 6454 compares origins; raises
    ValueError for a port out of range."""
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


def _header(response, wanted: bytes) -> bytes | None:
    for name, value in response.headers:  # h11 lowercases the names
        if name == wanted:
            return value
    return None


def _content_length(response: h11.Response) -> int | None:
    value = _header(response, b"content-length")  # h11 has checked it is a number
    return None if value is None else int(value)


def _location(response: Response) -> str | None:
    """Where a redirect points, if ``response`` is one."""
    value = _header(response, b"location") if response.status in REDIRECTS else None
    return None if value is None else quote_from_bytes(value, safe=_URL_SAFE)


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
    if isinstance(error, h11.RemoteProtocolError) and error.error_status_hint == 431:
        return f"the answer's head is longer than {MAX_HEAD} bytes"
    if isinstance(error, h11.RemoteProtocolError):
        return f"malformed answer: {error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
