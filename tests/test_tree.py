"""Trees read through cafuse match what casync and the source tree say."""

import hashlib
import stat
import time

import pytest
import trio

from cafuse import acl, catar
from cafuse.errors import FormatError
from cafuse.listing import quote

import oracle
from reading import open_made

CASYNC_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link",
                stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
                stat.S_IFSOCK: "socket"}


def read_all(made):
    """{path: (entry, content or None)} for everything in the archive."""
    inp = open_made(made)
    archive = inp.archive()

    async def run():
        out = {}
        async for path, entry in archive.walk(await archive.root()):
            data = await archive.read(entry, 0, entry.size) if entry.payload is not None \
                else None
            out[path] = (entry, data)
        return out

    return trio.run(run)


@pytest.fixture(scope="module")
def full(casync_archive):
    return casync_archive("full")


@pytest.fixture(scope="module")
def full_entries(full):
    return read_all(full)


def test_paths_match_casync(full, full_entries):
    listed = oracle.mtree(full.index, full.store)
    assert set(full_entries) == set(listed) - {b"."}


def test_metadata_matches_casync_mtree(full, full_entries):
    listed = oracle.mtree(full.index, full.store)
    for path, (entry, data) in full_entries.items():
        want = listed[path]
        assert want["type"] == CASYNC_TYPES[stat.S_IFMT(entry.mode)], path
        assert int(want["mode"], 8) == stat.S_IMODE(entry.mode), path
        assert (int(want["uid"]), int(want["gid"])) == (entry.uid, entry.gid), path
        assert want.get("uname") == (entry.user.decode() if entry.user else
                                     "root" if entry.uid == 0 else None), path
        seconds, nanos = want["time"].split(".")
        assert (int(seconds) * 10**9 + int(nanos)) % 2**64 == entry.mtime_ns % 2**64, path
        if "size" in want:
            assert int(want["size"]) == entry.size == len(data), path
        if "link" in want:
            assert want["link"] == entry.target, path
        if "device" in want:
            assert want["device"] == "linux,%d,%d" % entry.rdev, path
        if "sha512256digest" in want:
            assert hashlib.new("sha512_256", data).hexdigest() == want["sha512256digest"]


def expected_xattrs(info):
    """What catar keeps of a file's xattrs: user.*, trusted.*, the file
    capability and POSIX ACLs."""
    return {name: value for name, value in info.get("xattrs", {}).items()
            if name.startswith(("user.", "trusted.", "system.posix_acl_"))
            or name == "security.capability"}


def cafuse_xattrs(entry):
    out = {name.decode(): value for name, value in entry.xattrs}
    if entry.fcaps is not None:
        out["security.capability"] = entry.fcaps
    out.update(acl.xattrs(entry))
    return out


def compare_with_tree(entries, tree):
    source = oracle.walk_fs(tree)
    assert set(entries) == set(source)
    for path, (entry, data) in entries.items():
        info = source[path]
        assert entry.mode == info["mode"], path
        assert (entry.uid, entry.gid) == (info["uid"], info["gid"]), path
        assert entry.mtime_ns == info["mtime_ns"], path
        if "sha256" in info:
            assert hashlib.sha256(data).hexdigest() == info["sha256"], path
        assert entry.target == info.get("target"), path
        assert entry.rdev == info.get("rdev"), path
        if not stat.S_ISLNK(entry.mode):
            assert cafuse_xattrs(entry) == expected_xattrs(info), path


def test_matches_the_source_tree(full, full_entries):
    compare_with_tree(full_entries, full.tree)


def test_matches_casync_extract(full, full_entries, tmp_path):
    oracle.extract(full.index, full.store, tmp_path / "out")
    extracted = oracle.walk_fs(tmp_path / "out")
    for path, (entry, _data) in full_entries.items():
        if not stat.S_ISLNK(entry.mode):
            assert cafuse_xattrs(entry) == expected_xattrs(extracted[path]), path


def test_every_path_resolves_by_lookup(full, full_entries):
    archive = open_made(full).archive()

    async def run():
        for path, (entry, _data) in full_entries.items():
            found = await archive.resolve(path)
            assert (found.offset, found.name) == (entry.offset, entry.name)

    trio.run(run)


def test_symlinks_followed_inside_the_archive(full):
    archive = open_made(full).archive()

    async def run():
        link = await archive.resolve("dir-link")
        assert stat.S_ISLNK(link.mode)
        target = await archive.resolve("dir-link", follow=True)
        assert await archive.read(target, 0, 100) == b"deep\n"
        assert (await archive.resolve("dir/sub/../../hello.txt")).name == b"hello.txt"

    trio.run(run)


def test_long_names_and_mtimes_before_1970_and_after_2262(casync_archive):
    made = casync_archive("edge")
    entries = read_all(made)
    assert sorted(len(p) for p in entries) == [7, 10, 254, 255]
    assert entries[b"old.txt"][0].mtime_ns == -315619199_500000000
    assert entries[b"future.txt"][0].mtime_ns == 10413792000_500000000
    compare_with_tree(entries, made.tree)


def test_ten_thousand_entries(casync_archive):
    made = casync_archive("bigdir")
    entries = read_all(made)
    listed = oracle.mtree(made.index, made.store)
    assert len(entries) == 10_001
    assert set(entries) == set(listed) - {b"."}
    assert entries[b"big/file09999"][1] == b"9999\n"


VARIANTS = [(c, d, s) for c in ("zstd", "xz", "gzip") for d in ("sha512-256", "sha256")
            for s in ("4K", "64K")] + [("zstd", "sha512-256", "1M")]


@pytest.mark.parametrize("compression,digest,chunk_size", VARIANTS)
def test_variants_reassemble_and_list(casync_archive, compression, digest, chunk_size):
    made = casync_archive("full", compression=compression, digest=digest,
                          chunk_size=chunk_size)
    inp = open_made(made)
    assert inp.index.digest == digest
    whole = hashlib.new(digest.replace("-", "_"))
    trio.run(inp.source.copy, 0, inp.source.size, whole.update)
    assert whole.hexdigest() == made.digest
    compare_with_tree(read_all(made), made.tree)


def test_local_catar(casync_archive):
    made = casync_archive("full", kind="catar")
    entries = read_all(made)
    assert hashlib.new("sha512_256", made.index.read_bytes()).hexdigest() == made.digest
    compare_with_tree(entries, made.tree)


def test_concurrent_negative_lookups_check_a_large_table_once(casync_archive, monkeypatch):
    made = casync_archive("bigdir")               # 10,000 entries: checked in a thread
    sorts = []
    places = catar.goodbye_places
    monkeypatch.setattr(catar, "goodbye_places", lambda *a: sorts.append(1) or places(*a))

    inp = open_made(made)

    async def check():
        archive = inp.archive()
        big = await archive.lookup(await archive.root(), b"big")
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(archive.lookup, big, b"nope%d" % k)
        await inp.aclose()
    trio.run(check)
    assert len(sorts) == 1



def test_concurrent_lookups_share_a_failed_table_check(casync_archive, monkeypatch):
    made = casync_archive("bigdir")

    def failing(*args):
        time.sleep(0.3)
        raise FormatError("goodbye items overlap", 0)
    inp = open_made(made)

    async def check():
        archive = inp.archive()
        big = await archive.lookup(await archive.root(), b"big")
        monkeypatch.setattr(catar, "goodbye_places", failing)
        start, took = trio.current_time(), []

        async def lookup(name):
            with pytest.raises(FormatError):
                await archive.lookup(big, name)
            took.append(trio.current_time() - start)
        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(lookup, b"nope%d" % k)
        await inp.aclose()
        return took
    assert max(trio.run(check)) < 0.6              # one check, not four in turn


def test_names_that_do_not_print_are_escaped_so_that_no_two_look_alike():
    assert quote(b"a\\b\x01\xff") == "a\\\\b\\x01\\xff"
    assert quote("\u200b".encode()) == "\\u200b"
    assert quote("\U000f0000".encode()) == "\\U000f0000"
    assert quote("\uf000".encode() + b"0") == "\\uf0000"
