"""The file systems' FUSE handlers (mount.py), called directly with
requests as the kernel sends them: no FUSE mount needed."""

import bisect
import ctypes
import errno
import os
import signal
import struct
import subprocess
import sys
import time

import cachetools
import pytest
import trio

from cafuse import chattr, chunk, daemon, mount
from cafuse import fuseproto as proto
from cafuse.errors import ChunkError
from cafuse.fusesession import FuseError
from cafuse.inputs import Options, open_input

import oracle

_ENTRY = 40 + 88  # fuse_entry_out: its header and fuse_attr


def request(opcode, nodeid, body=b""):
    return proto.Request(opcode, 1, nodeid, 0, 0, 0, memoryview(body))


async def answer(handler, req):
    result = handler(req)
    if result is None or isinstance(result, bytes):
        return result
    return await result


def readdir_body(offset, size=4096):
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


def direntplus(payload, field=1):
    """(name, next offset) of each entry of a READDIRPLUS reply (or, with
    ``field=0``, (name, inode number))."""
    out, pos = [], 0
    while pos < len(payload):
        pos += _ENTRY
        fields = struct.unpack_from("<QQII", payload, pos)
        namelen = fields[2]
        pos += 24
        out.append((bytes(payload[pos:pos + namelen]), fields[field]))
        pos += (namelen + 7) & ~7
    return out


def dirents(payload):
    return direntplus(payload, field=0)


async def tree_fs(made):
    inp = await open_input(str(made.index), Options(stores=[str(made.store)], no_cache=True))
    return inp, await daemon.build_fs(inp)


async def looked_up(fs, name):
    """The node id of the root's child ``name``, as LOOKUP answers it."""
    found = await answer(fs.lookup, request(proto.LOOKUP, mount.ROOT, name + b"\0"))
    return struct.unpack_from("<Q", found)[0]


def counted_decodes(fs):
    """A list that gets the start of each child ``fs`` decodes from now on."""
    decoded, child = [], fs.archive.child

    async def counting(start, size):
        decoded.append(start)
        return await child(start, size)
    fs.archive.child = counting
    return decoded


@pytest.fixture
def twobigdirs(casync_archive, monkeypatch):
    """An archive of two 1,500-entry directories, a and b, over a listing
    cache of 1,000 entries."""
    monkeypatch.setattr(mount, "LISTED_ENTRIES", 1000)
    return casync_archive("twobigdirs")


def test_directories_larger_than_the_listing_cache_are_decoded_a_page_at_a_time(twobigdirs):
    # Two of them listed by turns: when a larger one was kept whole, alone,
    # each turn decoded the other whole again, once per page.  (Before that,
    # every READDIRPLUS of one failed with EIO.)

    async def check():
        inp, fs = await tree_fs(twobigdirs)
        decoded = counted_decodes(fs)
        offsets, names = {}, {}
        for name in (b"a", b"b"):
            node = await looked_up(fs, name)
            offsets[node], names[node] = 0, []
        while offsets:
            for node in list(offsets):
                page = direntplus(await answer(
                    fs.readdir, request(proto.READDIRPLUS, node, readdir_body(offsets[node]))))
                if not page:
                    del offsets[node]
                    continue
                names[node] += [name for name, _ in page]
                offsets[node] = page[-1][1]
        await inp.aclose()
        return list(names.values()), decoded

    names, decoded = trio.run(check)
    listed = [b".", b".."] + [b"file%05d" % i for i in range(1500)]
    assert names == [listed, listed]
    assert len(decoded) < 2 * 1500 * 1.1, len(decoded)


def test_a_paged_readdir_decodes_about_what_its_replies_hold(twobigdirs):
    # Plain READDIR entries are small: a reply holds about 100 of these.

    async def check():
        inp, fs = await tree_fs(twobigdirs)
        node = await looked_up(fs, b"a")
        decoded, names, offset = counted_decodes(fs), [], 0
        while page := plain_dirents(await answer(
                fs.readdir, request(proto.READDIR, node, readdir_body(offset)))):
            names += [name for name, _ in page]
            offset = page[-1][1]
        await inp.aclose()
        return names, decoded

    names, decoded = trio.run(check)
    assert names == [b".", b".."] + [b"file%05d" % i for i in range(1500)]
    assert len(decoded) < 1500 * 1.1, len(decoded)


def test_a_paged_reply_that_fails_counts_no_lookups(twobigdirs):

    async def check():
        inp, fs = await tree_fs(twobigdirs)
        node = await looked_up(fs, b"a")
        entries, calls = fs.archive.entries, []

        async def failing_third(places):
            calls.append(1)
            if len(calls) == 3:
                raise ChunkError("chunk 00: missing from every store")
            return await entries(places)
        fs.archive.entries = failing_third
        held = set(fs._lookups)
        try:
            await answer(fs.readdir, request(proto.READDIRPLUS, node,
                                             readdir_body(0, size=65536)))
        except FuseError as e:
            failed = e.errno
        await inp.aclose()
        return failed, set(fs._lookups) - held
    failed, counted = trio.run(check)
    assert failed == errno.EIO and counted == set()


def plain_dirents(payload):
    """(name, next offset) of each entry of a READDIR reply."""
    out, pos = [], 0
    while pos < len(payload):
        _ino, next_offset, namelen, _type = struct.unpack_from("<QQII", payload, pos)
        out.append((bytes(payload[pos + 24:pos + 24 + namelen]), next_offset))
        pos += 24 + ((namelen + 7) & ~7)
    return out


def test_listings_start_with_dot_and_dot_dot_naming_the_directory_and_its_parent(
        casync_archive):
    made = casync_archive("full")

    async def check():
        inp, fs = await tree_fs(made)
        found = await answer(fs.lookup, request(proto.LOOKUP, mount.ROOT, b"dir\0"))
        node = struct.unpack_from("<Q", found)[0]
        out = {}
        for directory in (mount.ROOT, node):
            payload = await answer(fs.readdir, request(proto.READDIRPLUS, directory,
                                                       readdir_body(0)))
            out[directory] = dirents(payload)
        # Asked from the middle: the offsets of one listing go on in the next.
        rest = dirents(await answer(fs.readdir, request(proto.READDIRPLUS, node,
                                                        readdir_body(1))))
        await inp.aclose()
        return node, out, rest

    node, out, rest = trio.run(check)
    root_ino = out[mount.ROOT][0][1]
    assert [name for name, _ in out[mount.ROOT][:2]] == [b".", b".."]
    assert out[mount.ROOT][1][1] == root_ino             # the root is its own parent
    assert out[node][0] == (b".", node) and out[node][1] == (b"..", root_ino)
    names = sorted(name for name, _ in out[node][2:])
    assert names == sorted(os.fsencode(n) for n in os.listdir(made.tree / "dir"))
    assert rest == out[node][1:]


def test_a_listing_someone_waits_for_is_urgent_and_readahead_is_not(casync_archive):
    made = casync_archive("full", chunk_size="4K")

    async def check():
        inp, fs = await tree_fs(made)
        engine, asked = fs.stream.engine, []
        get_many = engine.get_many

        async def recording(wanted, remember=True, urgent=True):
            asked.append(urgent)
            return await get_many(wanted, remember, urgent)
        engine.get_many = recording
        found = await answer(fs.lookup, request(proto.LOOKUP, mount.ROOT, b"dir\0"))
        node = struct.unpack_from("<Q", found)[0]
        await answer(fs.readdir, request(proto.READDIRPLUS, node, readdir_body(0)))
        listing = set(asked)
        asked.clear()
        await fs.stream.read(0, 1 << 16, urgent=False)  # what readahead asks
        await inp.aclose()
        return listing, set(asked)

    listing, readahead = trio.run(check)
    assert listing == {True} and readahead == {False}


def test_a_read_that_fails_is_logged_once_naming_the_file(casync_archive, caplog, monkeypatch):
    # The kernel asks again at once for a page whose read failed; a read
    # that keeps failing is told again 2 s after it last was.
    made = casync_archive("full")
    now = [0.0]
    monkeypatch.setattr(mount, "_logged", cachetools.TTLCache(64, 2.0, timer=lambda: now[0]))

    async def check():
        inp, fs = await tree_fs(made)
        node = await looked_up(fs, b"dir")
        for name in (b"sub", b"deep.txt"):
            found = await answer(fs.lookup, request(proto.LOOKUP, node, name + b"\0"))
            node = struct.unpack_from("<Q", found)[0]

        async def failing(offset, size, **_kwargs):
            raise ChunkError("chunk 00: missing from every store")
        fs.stream.read_cached = lambda offset, size: None
        fs.stream.read = failing
        failed = []
        for at in (0.0, 0.1, 1.5, 2.5):
            now[0] = at
            with pytest.raises(FuseError) as e:
                await answer(fs.read, request(proto.READ, node, readdir_body(0, size=4096)))
            failed.append(e.value.errno)
        await inp.aclose()
        return failed
    assert trio.run(check) == [errno.EIO] * 4
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    told = "read of /dir/sub/deep.txt, bytes 0..5: chunk 00: missing from every store"
    assert errors == [told, told]  # at 0 s and 2.5 s


def test_ioctl_answers_lsattr_and_refuses_what_does_not_fit(casync_archive):
    made = casync_archive("full")

    def ioctl(fs, node, cmd, out_size):
        body = struct.pack("<QIIQII", 0, 0, cmd, 0, 0, out_size)
        try:
            return fs.ioctl(request(proto.IOCTL, node, body))
        except FuseError as e:
            return e.errno

    async def check():
        inp, fs = await tree_fs(made)
        node = await looked_up(fs, b"noatime.txt")
        answers = [ioctl(fs, node, chattr.FS_IOC_GETFLAGS, 4),
                   ioctl(fs, node, chattr.FS_IOC_GETFLAGS, 2),  # no room
                   ioctl(fs, node, 0x5401, 0)]                  # TCGETS
        await inp.aclose()
        return answers

    flags, no_room, other = trio.run(check)
    assert flags == bytes(16) + struct.pack("<I", oracle.chattr(made.tree / "noatime.txt"))
    assert no_room == other == errno.ENOTTY


MiB = 1 << 20


def blob_read(offset, size, fh=1):
    return request(proto.READ, mount.BlobFS.FILE, struct.pack("<QQIIQII", fh, offset, size,
                                                              0, 0, 0, 0))


class BigChunks:
    """A stream of 64 chunks of 64 MiB (casync --chunk-size=4M:16M:64M of
    an image of zeros) that records what it is asked for, and keeps
    nothing: (offset, size, urgent) for reads and preloads."""

    class Index:
        def __init__(self, n, chunk):
            self.ends = [chunk * (i + 1) for i in range(n)]

        def __len__(self):
            return len(self.ends)

        def locate(self, offset):
            return bisect.bisect_right(self.ends, offset)

        def end(self, i):
            return self.ends[i]

    def __init__(self):
        self.index = self.Index(64, 64 * MiB)
        self.size, self.asked = self.index.ends[-1], []

    async def read(self, offset, size, urgent=True):
        self.asked.append((offset, size, urgent))
        return bytes(size)

    async def preload(self, ranges, urgent=True):
        self.asked.extend((offset, size, urgent) for offset, size in ranges)
        await trio.sleep(0)


def test_readahead_of_big_chunks_is_bounded_in_bytes():
    stream = BigChunks()
    fs = mount.BlobFS(stream, "blob", 0)

    async def main():
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery
            for k in range(40):                      # a sequential reader, as dd
                await fs.read(blob_read(k * MiB, MiB))
                await trio.sleep(0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    ahead = [size for _offset, size, urgent in stream.asked if not urgent]
    assert ahead and max(ahead) <= mount.READAHEAD_BYTES


def test_a_reader_of_a_chunk_too_big_for_the_memory_cache_decodes_it_once(
        tmp_path, monkeypatch):
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.write(b"stamp")
    index, store = tmp_path / "img.caibx", tmp_path / "store"
    subprocess.run(["casync", "make", f"--store={store}", "--chunk-size=4M:16M:64M",
                    index, image], check=True, capture_output=True)
    decodes, real = [], chunk.decode
    monkeypatch.setattr(chunk, "decode", lambda *a, **k: decodes.append(1) or real(*a, **k))
    monkeypatch.setattr(mount, "PREFETCH_TASKS", 0)  # the reader's own reads only

    async def main():
        inp = await open_input(str(index), Options(stores=[str(store)], no_cache=True))
        fs = await daemon.build_fs(inp)      # reads the first byte
        got = [await fs.read(blob_read(k * MiB, MiB)) for k in range(8)]
        await inp.aclose()
        return got

    got = trio.run(main)
    assert got == [b"stamp" + bytes(MiB - 5)] + [bytes(MiB)] * 7
    assert len(decodes) == 1


SYS_ADMIN = ("import sys, types; from cafuse.mount import _sys_admin; "
             "print(_sys_admin(types.SimpleNamespace(pid=int(sys.argv[1]), uid=0)))")
WITHOUT_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
IN_A_USER_NAMESPACE = ["unshare", "--user", "--map-root-user"]
AS_A_USER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("mount_by, caller, sees", [
    ([], [], True), ([], WITHOUT_SYS_ADMIN, False), ([], IN_A_USER_NAMESPACE, False),
    (AS_A_USER, [], True), (AS_A_USER, WITHOUT_SYS_ADMIN, False),
    (AS_A_USER, IN_A_USER_NAMESPACE, False),
], ids=["root", "root without it", "root of a user namespace", "a user's mount: root",
        "a user's mount: root without it", "a user's mount: root of a user namespace"])
def test_trusted_names_are_listed_to_callers_with_cap_sys_admin_of_the_initial_namespace(
        mount_by, caller, sees):
    # As the kernel decides for trusted.* (capable(), in the initial user
    # namespace), whichever user made the mount; all callers here are uid 0.
    if os.geteuid() != 0:
        pytest.skip("callers without the capability are made by root")
    proc = subprocess.Popen([*caller, "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/comm").read() != "sleep\n" \
                and time.monotonic() < deadline:     # set up, then exec'd
            time.sleep(0.01)
        judged = subprocess.run([*mount_by, sys.executable, "-c", SYS_ADMIN, str(proc.pid)],
                                capture_output=True, text=True, timeout=30,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        proc.kill()
        proc.wait()
    assert judged.stdout == f"{sees}\n", judged.stderr


def test_root_of_a_user_namespace_given_the_whole_identity_map_sees_no_trusted_names():
    # Its uid_map reads as the initial namespace's, but its capabilities
    # count only in its own (the kernel hides trusted.* from it).
    if os.geteuid() != 0:
        pytest.skip("giving a namespace the whole map takes root")
    made, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # no exec, which would drop the capabilities it has there
        ctypes.CDLL(None, use_errno=True).unshare(0x10000000)  # CLONE_NEWUSER
        os.write(go, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        os.read(made, 1)
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write("0 0 4294967295")
        judged = subprocess.run([sys.executable, "-c", SYS_ADMIN, str(pid)],
                                capture_output=True, text=True, timeout=30)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert judged.stdout == "False\n", judged.stderr
