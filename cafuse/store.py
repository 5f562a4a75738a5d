"""Chunk stores: local directories and HTTP(S) servers in casync's layout.

``<store>/<first 4 hex>/<64 hex>.cacnk`` is a compressed chunk and
``<store>/<first 4 hex>/<64 hex>`` an uncompressed one (casync-format
§4.1); a local store may mix both, an HTTP store serves ``.cacnk`` only, as
casync's own HTTP helper asks for nothing else (§4.3).

A local store is read with blocking calls (``load``), in the worker thread
that also decodes the chunk; an HTTP store is read with ``await fetch``.
"""

import datetime
import email.utils
import os
import random
import time
from dataclasses import dataclass

import trio

from .chunk import compressed_bound
from .errors import CafuseError
from .http import Client, HTTPError, TLSOptions, check_url, shown, split_credentials
from .index import CHUNK_SIZE_LIMIT
from .slots import Priority

SUFFIX = os.environ.get("CASYNC_COMPRESSED_CHUNK_SUFFIX", ".cacnk")


def chunk_path(chunk_id: bytes) -> str:
    name = chunk_id.hex()
    return f"{name[:4]}/{name}"


class LocalStore:
    blocking = True

    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    def load(self, chunk_id: bytes) -> tuple[bytes, bool] | None:
        """The chunk file's bytes and whether they are compressed; None if
        the store does not have the chunk."""
        base = os.path.join(self.path, chunk_path(chunk_id))
        for path, compressed in ((base + SUFFIX, True), (base, False)):
            try:
                with open(path, "rb") as f:
                    return f.read(), compressed
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CafuseError(f"{path}: {e.strerror}") from None
        if not os.path.isdir(self.path):
            raise CafuseError(f"{self.path}: chunk store not found (no such directory)")
        return None

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True)
class HTTPOptions:
    """How to talk to HTTP(S) stores and index URLs."""
    connections: int = 16         # per store: requests in flight
    timeout: float = 10.0         # seconds for one request
    retries: int = 3              # further tries of a failed request
    backoff: float = 0.2          # first retry delay, doubled each time
    headers: tuple[tuple[str, str], ...] = ()
    tls: TLSOptions = TLSOptions()


class HTTPStore:
    """A store on an HTTP(S) server.  An answer larger than a chunk of
    ``largest_chunk`` bytes can be once compressed is refused as soon as
    it is seen to be (a server streaming without end must not fill the
    memory)."""
    blocking = False

    def __init__(self, url: str, options: HTTPOptions, largest_chunk: int = CHUNK_SIZE_LIMIT):
        # Cut at parameters or a query as casync does, not inside a password.
        url, auth = split_credentials(url)
        check_url(url)
        self.url = url.split("?")[0].split(";")[0].rstrip("/")
        self.options = options
        self.client = Client(self.url, options.connections, options.headers, options.tls,
                             max_body=compressed_bound(largest_chunk), auth=auth)

    def __str__(self) -> str:
        return self.url

    async def fetch(self, chunk_id: bytes, priority: Priority | None = None,
                    others_left: bool = False, held=None) -> tuple[bytes, bool] | None:
        """The compressed chunk, or None on 404/410.  Connection errors,
        timeouts, 5xx and 429 are retried with exponential back-off and
        jitter; what still fails raises HTTPError.  With ``others_left``
        (another store would be asked next), a request that timed out is
        not tried again: a hung server would keep the chunk for all its
        tries, which may outlast the chunk's deadline.  ``held()`` is
        called once the request holds a connection."""
        return await fetch_with_retries(self.client, chunk_path(chunk_id) + SUFFIX,
                                        self.options, missing_ok=True, priority=priority,
                                        retry_timeouts=not others_left, held=held)

    async def aclose(self) -> None:
        await self.client.aclose()


async def fetch_with_retries(client: Client, path: str, options: HTTPOptions,
                             missing_ok: bool, priority: Priority | None = None,
                             retry_timeouts: bool = True, held=None) -> tuple[bytes, bool] | None:
    delay, attempt = options.backoff, 0
    # One place among the client's requests in flight for all the tries: a
    # try that queued again behind every other chunk would, on a dead store
    # with a long queue, never run out of tries within the chunk's
    # deadline, so the store would never be set aside for the next one.
    async with client.slots.hold(priority or Priority()):
        if held is not None:
            held()
        while True:
            asked = 0.0   # the wait the server asks for before a retry
            try:
                response = await client.get_in_slot(path, options.timeout)
            except HTTPError as e:
                error = e
            else:
                if response.status == 200:
                    return response.body, True
                if response.status in (404, 410) and missing_ok:
                    return None
                retryable = response.status >= 500 or response.status == 429
                error = HTTPError(f"{client.url(path)}: HTTP {response.status}", retryable)
                asked = retry_after(response)
            if not error.retryable or attempt >= options.retries \
                    or (error.timed_out and not retry_timeouts):
                raise error
            attempt += 1
            # A server's Retry-After is heeded up to --timeout: a longer
            # one would outlast the chunk's deadline anyway.
            await trio.sleep(max(delay * (0.5 + random.random()), min(asked, options.timeout)))
            delay *= 2


def retry_after(response, now: float | None = None) -> float:
    """The seconds a 503 or 429 asks to wait (RFC 9110 §10.2.3: seconds, or
    an HTTP date, ``now`` being the time since the epoch); 0 if it names
    neither."""
    for name, value in response.headers:
        if name != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return float(text)
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:  # an HTTP date is in GMT, said or not
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return 0.0


def is_url(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


def other_url(spec: str) -> bool:
    """Whether ``spec`` is a URL of a scheme cafuse does not read."""
    return "://" in spec and not is_url(spec)


def open_store(spec: str, options: HTTPOptions, largest_chunk: int = CHUNK_SIZE_LIMIT):
    if not spec:
        raise CafuseError("-s '': a store is a directory or an http(s) URL, not nothing")
    if is_url(spec):
        return HTTPStore(spec, options, largest_chunk)
    if other_url(spec):
        raise CafuseError(f"{shown(spec)}: unsupported store URL (http, https or a directory)")
    return LocalStore(spec)
