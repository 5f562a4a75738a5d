"""URLs as users write them: credentials that no message shows, schemes
cafuse does not read, headers, and a Location's credentials."""
import pytest
import trio

from cafuse.errors import CafuseError
from cafuse.http import Client, HTTPError
from cafuse.inputs import parse_seed
from cafuse.store import HTTPOptions, open_store
from command import run
from servers import FaultServer
from test_http_faults import answering_targets, recording, serve

SECRET = "Sup3rS3cret"


def run_cli(_capsys, *argv):
    """The command's exit status and stderr (in its own process: the CLI
    sets signal handlers of its own)."""
    done = run(*argv, ok=False, timeout=60)
    return done.returncode, done.stderr.decode()


# A URL of another scheme (an upper-case HTTP:// is http) is refused,
# named without its password.
@pytest.mark.parametrize("url", [f"HTTP://u:{SECRET}@127.0.0.1:1/d/x.caidx",
                                 f"HTTPS://u:{SECRET}@127.0.0.1:1/d/x.caidx",
                                 f"ftp://u:{SECRET}@127.0.0.1:1/d/x.caidx"])
@pytest.mark.parametrize("command", ["info", "ls", "prefetch"])
def test_an_index_url_of_another_scheme_is_named_without_its_password(capsys, tmp_path, url,
                                                                     command):
    cache = [] if command == "info" else ["--cache-dir", str(tmp_path)]
    status, err = run_cli(capsys, command, *cache, url)
    assert status == 1
    assert SECRET not in err, err


def test_mount_of_an_uppercase_url_is_named_without_its_password(capsys, tmp_path):
    status, err = run_cli(capsys, "mount", "--no-cache",
                          f"HTTP://u:{SECRET}@127.0.0.1:1/d/x.caidx", str(tmp_path))
    assert status == 1
    assert SECRET not in err, err


@pytest.mark.parametrize("url", [f"ftp://u:{SECRET}@127.0.0.1/store",
                                 f"sftp://u:{SECRET}@127.0.0.1/store"])
def test_a_store_url_of_another_scheme_is_named_without_its_password(url):
    with pytest.raises(CafuseError) as e:
        open_store(url, HTTPOptions())
    assert SECRET not in str(e.value), str(e.value)


def test_a_seed_url_is_named_without_its_password():
    with pytest.raises(CafuseError) as e:
        parse_seed(f"http://u:{SECRET}@127.0.0.1/d/x.caidx")
    assert SECRET not in str(e.value), str(e.value)


# A '/', '?' or '#' left unencoded in a password makes the URL invalid;
# its message would show the password (all of it for '/').
@pytest.mark.parametrize("sep", ["/", "?", "#"])
def test_an_unencoded_delimiter_in_a_password_does_not_show_it(capsys, sep):
    password = f"{SECRET}{sep}xyz"
    status, err = run_cli(capsys, "info", f"http://u:{password}@127.0.0.1:1/d/x.caidx")
    assert status == 1
    assert SECRET not in err, err


# A header value that is not ASCII is sent as UTF-8, as curl does.
@pytest.mark.parametrize("how", ["-H", "env"])
def test_a_non_ascii_header_is_an_error_not_a_traceback(capsys, monkeypatch, tmp_path, how):
    with FaultServer(tmp_path) as server:
        argv = ["info", f"{server.url}/x.caidx"]
        if how == "-H":
            argv[1:1] = ["-H", "X-Note: caf\u00e9"]
        else:
            monkeypatch.setenv("CAFUSE_HTTP_HEADERS", "X-Note: caf\u00e9")
        status, err = run_cli(capsys, *argv)
    assert status == 1 and err.startswith("cafuse: error: ") and "HTTP 404" in err


# A scheme-relative Location that is no valid URL: named without its password.
@pytest.mark.parametrize("location", [f"//u:{SECRET}@[::1/x", f"//u:{SECRET}@127.0.0.1:99999/x"])
async def test_an_invalid_scheme_relative_location_is_named_without_its_password(location):
    async with trio.open_nursery() as n:
        c = Client(await serve(n, answering_targets([location.encode()])))
        with pytest.raises(HTTPError) as e:
            await c.get("start")
        n.cancel_scope.cancel()
    assert SECRET not in str(e.value), str(e.value)


# casync (curl) sends no credentials taken from a redirect's Location.
async def test_credentials_in_a_location_are_not_sent_as_casync_does_not():
    heads = []
    async with trio.open_nursery() as n:
        there = await serve(n, recording(heads))
        location = there.replace("http://", f"http://u:{SECRET}@") + "/x"
        c = Client(await serve(n, answering_targets([location.encode()])))
        await c.get("start")
        await c.aclose()
        n.cancel_scope.cancel()
    assert b"authorization" not in heads[0], heads[0]
