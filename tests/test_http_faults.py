"""HTTP client faults found in review: stale keep-alive connections,
bytes after a response, a timeout that counted the wait for a connection,
sockets left open by failed TLS handshakes."""
import base64
import contextlib
import os

import pytest
import trio
import trio.testing

from cafuse import http
from cafuse.errors import CafuseError
from cafuse.http import Client, HTTPError, Response, split_credentials
from cafuse.inputs import default_store, read_index
from cafuse.slots import Priority
from cafuse.store import HTTPOptions, HTTPStore, fetch_with_retries, retry_after

RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def serve(nursery, handler):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def client_of(handler, **options):
    """A Client of a server that runs ``handler`` on each connection; both
    are gone afterwards."""
    async with trio.open_nursery() as nursery:
        client = Client(await serve(nursery, handler), **options)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


async def read_request(stream):
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    return buf


async def one_then_close(stream):
    """Serve one request per connection, keep-alive advertised, then close
    (what a server's keep-alive timeout does to an idle connection)."""
    if await read_request(stream):
        await stream.send_all(RESP)
    await trio.sleep(0.05)
    await stream.aclose()


async def test_stale_keepalive_is_retried():
    async with trio.open_nursery() as n:
        url = await serve(n, one_then_close)
        c = Client(url)
        assert (await c.get("a")).body == b"ok"
        await trio.sleep(0.2)                      # server closed the idle connection
        assert (await c.get("b")).body == b"ok"    # must retry on a fresh connection
        n.cancel_scope.cancel()


async def test_many_stale_idle_connections():
    async with trio.open_nursery() as n:
        url = await serve(n, one_then_close)
        c = Client(url, max_connections=8)
        async with trio.open_nursery() as m:      # fill the pool with 8 idle connections
            for k in range(8):
                m.start_soon(c.get, f"x{k}")
        await trio.sleep(0.2)                      # all 8 closed by the server
        opts = HTTPOptions(retries=3, backoff=0.01)
        assert await fetch_with_retries(c, "y", opts, missing_ok=False) == (b"ok", True)
        n.cancel_scope.cancel()


async def slow_server(stream):
    while await read_request(stream):
        await trio.sleep(0.2)                      # every answer takes 0.2 s
        await stream.send_all(RESP)


async def test_the_timeout_does_not_count_the_wait_for_a_connection():
    # One connection, answers in 0.2 s, a 0.5 s timeout: the fourth request
    # waits 0.6 s for the connection, then gets its answer in time.
    async with trio.open_nursery() as n:
        url = await serve(n, slow_server)
        c = Client(url, max_connections=1)
        opts = HTTPOptions(timeout=0.5, retries=0)
        got = []

        async def fetch(k):
            got.append(await fetch_with_retries(c, f"c{k}", opts, missing_ok=False))
        async with trio.open_nursery() as m:
            for k in range(4):
                m.start_soon(fetch, k)
        assert got == [(b"ok", True)] * 4
        n.cancel_scope.cancel()


async def test_bytes_after_a_response_are_not_read_as_the_next_response():
    async def extra(stream):
        await read_request(stream)
        # a buggy server/proxy: one response too many (or a body longer than its Content-Length)
        await stream.send_all(RESP + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
        await read_request(stream)
        await trio.sleep(1)
    async with trio.open_nursery() as n:
        url = await serve(n, extra)
        c = Client(url)
        assert (await c.get("index.caidx")).body == b"ok"
        await trio.sleep(0.1)
        body = (await c.get("other.caidx")).body
        n.cancel_scope.cancel()
    assert body != b"WRONG", "the second request got the first one's stray bytes as its response"


async def test_a_demand_read_does_not_queue_behind_readahead():
    # One connection, 0.2 s an answer: six chunks read ahead are queued when
    # a reader asks for another; it is answered next, not seventh.
    async with trio.open_nursery() as n:
        url = await serve(n, slow_server)
        c = Client(url, max_connections=1)
        opts = HTTPOptions(retries=0)
        done = []

        async def fetch(name, urgent):
            await fetch_with_retries(c, name, opts, missing_ok=False,
                                     priority=Priority(urgent))
            done.append(name)
        async with trio.open_nursery() as m:
            for k in range(6):
                m.start_soon(fetch, f"ahead{k}", False)
                await trio.testing.wait_all_tasks_blocked()
            m.start_soon(fetch, "read", True)
        assert done.index("read") <= 1
        n.cancel_scope.cancel()


async def not_tls(stream):
    """A server on an https:// URL that answers the TLS hello in plain text."""
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await stream.aclose()


async def test_a_failed_tls_handshake_closes_its_socket_at_once():
    async with trio.open_nursery() as n:
        url = (await serve(n, not_tls)).replace("http://", "https://")
        c = Client(url)
        before = len(os.listdir("/proc/self/fd"))
        errors = []                               # kept, with their tracebacks
        for _ in range(20):
            try:
                await c.get("a")
            except HTTPError as e:
                errors.append(e)
        assert len(errors) == 20 and "cannot connect" in str(errors[0])
        assert len(os.listdir("/proc/self/fd")) - before < 5
        n.cancel_scope.cancel()


async def test_stray_bytes_that_come_while_a_connection_is_idle_never_answer_a_request():
    async def stray_later(stream):
        with contextlib.suppress(trio.BrokenResourceError):  # the client resets it
            while await read_request(stream):
                await stream.send_all(RESP)
                await trio.sleep(0.05)  # apart from the response: it looked complete
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
    async with trio.open_nursery() as n:
        url = await serve(n, stray_later)
        c = Client(url)
        assert (await c.get("a")).body == b"ok"
        await trio.sleep(0.2)
        assert (await c.get("b")).body == b"ok"
        n.cancel_scope.cancel()


async def test_a_malformed_answer_on_a_reused_connection_is_tried_on_a_fresh_one():
    async def junk_second(stream):
        await read_request(stream)
        await stream.send_all(RESP)
        if await read_request(stream):
            await stream.send_all(b"junk\r\n\r\n")  # what stray bytes look like
        await stream.aclose()
    async with trio.open_nursery() as n:
        url = await serve(n, junk_second)
        c = Client(url)
        assert (await c.get("a")).body == b"ok"
        assert (await c.get("b")).body == b"ok"
        n.cancel_scope.cancel()


async def gigabytes(stream, status):
    if await read_request(stream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 5000000000\r\n\r\n"
                                  .encode())
            while True:
                await stream.send_all(bytes(1 << 16))


async def test_a_body_larger_than_the_bound_is_refused_but_an_errors_status_is_kept():
    async with trio.open_nursery() as n:
        c200 = Client(await serve(n, lambda s: gigabytes(s, 200)), max_body=1000)
        c404 = Client(await serve(n, lambda s: gigabytes(s, 404)), max_body=1000)
        with pytest.raises(HTTPError, match="announces 5000000000 bytes; at most 1000") as e:
            await c200.get("chunk")
        assert not e.value.retryable
        response = await c404.get("chunk")     # missing: what its page says is not needed
        assert (response.status, response.body) == (404, b"")
        n.cancel_scope.cancel()


async def test_an_endless_body_is_cut_at_the_bound():
    async def endless(stream):
        if await read_request(stream):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                while True:
                    await stream.send_all(bytes(1 << 16))
    async with client_of(endless, max_body=1 << 20) as c:
        with pytest.raises(HTTPError, match="goes on past 1048576 bytes"):
            await c.get("chunk")


async def test_a_redirect_elsewhere_is_followed_without_the_extra_headers():
    seen = []

    async def there(stream):
        request = await read_request(stream)
        seen.append(request)
        await stream.send_all(RESP)
    async with trio.open_nursery() as n:
        other = await serve(n, there)

        async def here(stream):
            if await read_request(stream):
                await stream.send_all(f"HTTP/1.1 302 Found\r\nLocation: {other}/signed?x=1"
                                      f"\r\nContent-Length: 0\r\n\r\n".encode())
        c = Client(await serve(n, here), headers={"Authorization": "Bearer secret"})
        assert (await c.get("chunk")).body == b"ok"
        assert seen[0].startswith(b"GET /signed?x=1 HTTP/1.1") and b"secret" not in seen[0]
        await c.aclose()
        n.cancel_scope.cancel()


async def test_a_redirect_loop_ends_in_a_clear_error():
    async def loop(stream):
        while await read_request(stream):
            await stream.send_all(b"HTTP/1.1 301 Moved\r\nLocation: /again\r\n"
                                  b"Content-Length: 0\r\n\r\n")
    async with client_of(loop) as c:
        with pytest.raises(HTTPError, match="/again: more than 5 redirects"):
            await c.get("chunk")


async def test_a_timeout_after_part_of_the_answer_says_how_much_came():
    async def half(stream):
        if await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
            await trio.sleep(5)
    async with client_of(half) as c:
        with pytest.raises(HTTPError, match=r"answer incomplete after 0.3 s \(2 of 10 bytes\)"):
            await c.get_in_slot("chunk", timeout=0.3)


async def test_the_chunk_is_asked_for_as_it_is_and_a_coded_answer_refused():
    # Without Accept-Encoding any coding is acceptable (RFC 9110 §12.5.3).
    asked = []

    async def gzipping(stream):  # whatever it is asked
        asked.append(await read_request(stream))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                              b"Content-Length: 2\r\n\r\nok")
    async with client_of(gzipping) as c:
        with pytest.raises(HTTPError, match="in the content coding gzip, not as it is"):
            await c.get("chunk")
        assert b"accept-encoding: identity" in asked[0].lower()


async def test_a_retry_waits_as_long_as_the_server_asks_up_to_the_timeout():
    async def busy_once(stream):
        answers = [b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"]
        while await read_request(stream):
            await stream.send_all(answers.pop() if answers else RESP)
    async with client_of(busy_once) as c:
        start = trio.current_time()
        opts = HTTPOptions(retries=1, backoff=0.01, timeout=5)
        assert await fetch_with_retries(c, "x", opts, missing_ok=False) == (b"ok", True)
        assert trio.current_time() - start >= 1.0


def answering_targets(seen):
    """A server that redirects /start to what ``seen[0]`` says (raw bytes)
    and answers any other target with its own name."""
    async def handler(stream):
        while request := await read_request(stream):
            target = request.split(b" ")[1]
            seen.append(target)
            if target.endswith(b"/start"):
                await stream.send_all(b"HTTP/1.1 302 Found\r\nLocation: " + seen[0]
                                      + b"\r\nContent-Length: 0\r\n\r\n")
            else:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                      % len(target) + target)
    return handler


async def test_a_location_and_a_url_that_are_not_ascii_are_asked_for_percent_encoded():
    # As curl does: servers do send raw UTF-8 and spaces in Location.
    async with trio.open_nursery() as n:
        for location, asked in ((b"/f\xc3\xa9 x", b"/f%C3%A9%20x"), (b"/a%20b", b"/a%20b")):
            seen = [location]
            c = Client(await serve(n, answering_targets(seen)))
            assert (await c.get("start")).body == asked
        seen = [b"-"]
        c = Client(await serve(n, answering_targets(seen)) + "/d\u00e9")
        assert (await c.get("x y")).body == b"/d%C3%A9/x%20y"
        n.cancel_scope.cancel()


async def test_a_redirect_to_an_invalid_url_is_an_error_not_a_retry():
    async with client_of(answering_targets([b"http://[::1/x"])) as c:
        with pytest.raises(HTTPError, match=r"redirected to http://\[::1/x: not a valid URL") \
                as e:
            await c.get("start")
        assert not e.value.retryable


async def test_a_redirect_whose_target_never_answers_says_no_answer():
    async def silent(stream):
        await trio.sleep(5)
    async with trio.open_nursery() as n:
        elsewhere = await serve(n, silent)
        c = Client(await serve(n, answering_targets([f"{elsewhere}/hang".encode()])))
        with pytest.raises(HTTPError, match=r"/hang: no answer within 0.3 s$"):
            await c.get_in_slot("start", timeout=0.3)
        await c.aclose()
        n.cancel_scope.cancel()


async def test_content_coding_names_are_told_apart_whatever_their_case():
    async def identity(stream):  # RFC 9110 §8.4.1: case-insensitive
        while await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Encoding: Identity\r\n"
                                  b"Content-Length: 2\r\n\r\nok")
    async with client_of(identity) as c:
        assert (await c.get("x")).body == b"ok"


async def test_a_long_head_is_taken_and_a_far_too_long_one_named():
    async def long_head(stream):
        request = await read_request(stream)
        size = int(request.split(b" ")[1].strip(b"/"))
        with contextlib.suppress(trio.BrokenResourceError):  # the client gives up
            await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Policy: " + b"p" * size
                                  + b"\r\nContent-Length: 2\r\n\r\nok")
    async with client_of(long_head) as c:
        assert (await c.get("20000")).body == b"ok"   # a CDN's cookies and policies
        # (h11 takes a longer head that came whole in one read: 400 kB cannot)
        with pytest.raises(HTTPError, match="the answer's head is longer than 65536 bytes"):
            await c.get("400000")


def recording(heads):
    """A server that answers "ok" to every request, keeping their heads."""
    async def handler(stream):
        while request := await read_request(stream):
            heads.append(request.lower())
            await stream.send_all(RESP)
    return handler


async def test_a_user_and_password_in_the_url_are_sent_as_basic_auth_and_never_shown():
    # As casync (curl) does: http://user:pw@host/... behind auth_basic.
    heads = []
    async with trio.open_nursery() as n:
        url = (await serve(n, recording(heads))).replace("http://", "http://us%40er:s3cret@")
        assert (await Client(url + "/store").get("x")).body == b"ok"
        store = HTTPStore(url + "/store", HTTPOptions())
        n.cancel_scope.cancel()
    assert basic("us@er:s3cret") in heads[0]
    assert "s3cret" not in str(store) and "us%40er" not in str(store)
    assert str(store) == url.replace("us%40er:s3cret@", "") + "/store"


async def test_a_header_given_replaces_the_clients_own_of_that_name():
    heads = []
    async with client_of(recording(heads),
                         headers={"host": "example.com", "User-Agent": "mine"}) as c:
        assert (await c.get("x")).body == b"ok"
    assert heads[0].count(b"host:") == 1 and b"host: example.com" in heads[0]
    assert heads[0].count(b"user-agent:") == 1 and b"user-agent: mine" in heads[0]


async def test_a_timeout_on_the_fresh_connection_of_a_retry_tells_of_that_try_alone():
    connections = []

    async def half_then_silent(stream):
        connections.append(stream)
        with contextlib.suppress(trio.BrokenResourceError):
            if len(connections) == 1:      # reused: half an answer, then closed
                await read_request(stream)
                await stream.send_all(RESP)
                await read_request(stream)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
                await stream.aclose()
            else:
                await read_request(stream)
                await trio.sleep(5)
    async with client_of(half_then_silent) as c:
        await c.get("a")
        with pytest.raises(HTTPError, match=r"/b: no answer within 0.5 s$"):
            await c.get_in_slot("b", timeout=0.5)


def test_the_default_store_of_an_index_url_with_a_semicolon_is_next_to_it():
    # A store URL is cut at ';' (as casync does); the directory of the index
    # is not a store URL given with parameters.
    store = HTTPStore(default_store("http://127.0.0.1:1/s;t/blob.caibx"), HTTPOptions())
    assert store.client.url("x") == "http://127.0.0.1:1/s%3Bt/default.castr/x"


SECRET = "s3cr;t"


@pytest.mark.parametrize("url", [f"http://u:{SECRET}@127.0.0.1:99999/d/a.caidx",
                                 f"http://u:{SECRET}@/d/a.caidx",
                                 f"http://u:{SECRET}@[::1/d/a.caidx"])
async def test_an_invalid_url_is_named_without_its_password(url):
    with pytest.raises(CafuseError) as e:
        await read_index(url, HTTPOptions())
    assert SECRET not in str(e.value) and "/d" in str(e.value)


async def test_a_store_url_keeps_a_semicolon_of_its_password_and_cuts_its_path_there():
    # casync cuts a store URL at ';' and '?': in its path, not in a password.
    heads = []
    async with trio.open_nursery() as n:
        url = (await serve(n, recording(heads))).replace("http://", f"http://u:{SECRET}@")
        store = HTTPStore(url + "/store;v=1?x", HTTPOptions())
        assert await store.fetch(bytes(32)) == (b"ok", True)
        n.cancel_scope.cancel()
    assert str(store) == url.replace(f"u:{SECRET}@", "") + "/store"
    assert heads[0].startswith(b"get /store/0000/") and basic(f"u:{SECRET}") in heads[0]


def basic(pair: str | bytes) -> bytes:
    """The header line of Basic authentication with ``pair``, lowercased."""
    raw = pair.encode() if isinstance(pair, str) else pair
    return b"authorization: basic " + base64.b64encode(raw).lower()


def test_percent_encoded_bytes_of_a_user_and_password_are_sent_as_those_bytes():
    assert split_credentials("http://u%40x:%FF%3A@h/p") == (
        "http://h/p", "Basic " + base64.b64encode(b"u@x:\xff:").decode())
    assert split_credentials("http://u@h/p@q") == (
        "http://h/p@q", "Basic " + base64.b64encode(b"u:").decode())
    assert split_credentials("http://h/p@q") == ("http://h/p@q", None)


async def test_a_header_given_twice_in_any_case_is_sent_once_the_last_winning():
    heads = []
    headers = [("authorization", "Bearer a"), ("Authorization", "Bearer b")]
    async with client_of(recording(heads), headers=headers) as c:
        assert (await c.get("x")).body == b"ok"
    assert heads[0].count(b"authorization:") == 1 and b"bearer b" in heads[0]


async def test_credentials_stay_on_a_redirect_to_the_same_origin_written_otherwise():
    # Host names compare case-insensitively, and :80 is http's own port.
    heads = []

    async def handler(stream):
        while request := await read_request(stream):
            heads.append(request.lower())
            if request.startswith(b"GET /start "):
                port = request.split(b"Host: ")[1].split(b"\r\n")[0].split(b":")[1]
                await stream.send_all(b"HTTP/1.1 302 Found\r\nLocation: http://LOCALHOST:"
                                      + port + b"/there\r\nContent-Length: 0\r\n\r\n")
            else:
                await stream.send_all(RESP)
    async with trio.open_nursery() as n:
        url = (await serve(n, handler)).replace("http://127.0.0.1", "http://u:pw@localhost")
        c = Client(url, headers={"X-Token": "t"})
        assert (await c.get("start")).body == b"ok"
        await c.aclose()
        n.cancel_scope.cancel()
    assert heads[1].startswith(b"get /there ") and basic("u:pw") in heads[1]
    assert b"x-token: t" in heads[1]


async def test_a_head_far_too_long_is_not_asked_for_again():
    asked = []

    async def long_head(stream):
        asked.append(await read_request(stream))
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nX: " + b"p" * 400_000 + b"\r\n\r\n")
    async with client_of(long_head) as c:
        with pytest.raises(HTTPError, match="head is longer") as e:
            await fetch_with_retries(c, "x", HTTPOptions(retries=3, backoff=0.01),
                                     missing_ok=False)
        assert not e.value.retryable and len(asked) == 1


def test_retry_after_is_read_in_seconds_or_as_an_http_date():
    def asked(value):
        return retry_after(Response(503, [(b"retry-after", value)], b""), now=1445412470.0)
    assert asked(b"7") == 7.0
    assert asked(b"Wed, 21 Oct 2015 07:28:00 GMT") == 10.0     # RFC 9110's example
    assert asked(b"Wed, 21 Oct 2015 07:28:00") == 10.0
    assert asked(b"Wed, 21 Oct 2015 07:27:00 GMT") == 0.0      # past
    assert asked(b"soon") == 0.0


async def test_redirects_to_more_origins_than_are_kept_are_served_and_closed(monkeypatch):
    monkeypatch.setattr(http, "MAX_ORIGINS", 1)
    connections = {0: 0, 1: 0}

    def there(k):
        async def handler(stream):
            connections[k] += 1
            while await read_request(stream):
                await stream.send_all(RESP)
        return handler
    async with trio.open_nursery() as n:
        elsewhere = [await serve(n, there(k)) for k in range(2)]

        async def here(stream):
            while request := await read_request(stream):
                other = elsewhere[int(request.split(b" ")[1].strip(b"/"))]
                await stream.send_all(f"HTTP/1.1 302 Found\r\nLocation: {other}/x\r\n"
                                      f"Content-Length: 0\r\n\r\n".encode())
        c = Client(await serve(n, here))
        assert [(await c.get(k)).body for k in ("0", "1", "1", "0")] == [b"ok"] * 4
        assert len(c._elsewhere) == 1
        assert connections == {0: 1, 1: 2}  # the first kept, the second's used once each
        await c.aclose()
        n.cancel_scope.cancel()
