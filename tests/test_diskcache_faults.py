"""Disk cache faults found in review: pack ids reused after a prune, a
prune that died before its unlink, a corrupt index or row, a full disk,
descriptors of packs pruned by another process."""

import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from cafuse.diskcache import DiskCache, DiskFull
from cafuse.errors import CafuseError


def cid(data):
    return hashlib.sha256(data).digest()


def test_pack_id_reuse_never_serves_wrong_bytes(tmp_path):
    # A: a mount; B: `cafuse cache prune --max-size 0` in another process.
    old, new = b"A" * 4096, b"B" * 4096          # same size (e.g. max-size chunks)
    x = DiskCache(str(tmp_path), 1 << 30)         # another mount wrote pack 1
    x.put(cid(old), old); x.close()
    a = DiskCache(str(tmp_path), 1 << 30)
    assert a.get(cid(old)) == old                 # A caches a read fd for pack 1
    b = DiskCache(str(tmp_path), 1 << 30)
    b.prune(0)                                    # pack 1 deleted, rows gone
    b.close()
    a.put(cid(new), new); a.flush()               # new pack gets id 1 again
    got = a.get(cid(new))
    assert got in (None, new), f"served {got[:4]!r}... for chunk of {new[:4]!r}..."


def test_a_full_index_is_a_cache_error(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    c._db.execute("PRAGMA max_page_count = %d" % c._db.execute("PRAGMA page_count").fetchone()[0])
    try:
        for i in range(2000):
            d = i.to_bytes(4, "big") * 64
            c.put(cid(d), d)
        c.flush()
    except Exception as e:
        assert isinstance(e, CafuseError)   # the engine only catches CafuseError
    else:
        pytest.fail("no error")


def test_a_corrupt_index_is_a_cache_error(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    for i in range(3000):
        d = i.to_bytes(4, "big") * 8
        c.put(cid(d), d)
    c.close()
    path = tmp_path / "index.sqlite"
    raw = bytearray(path.read_bytes())
    for k in range(4096 * 2, len(raw), 4096):    # scribble over every page but the first two
        raw[k:k + 64] = b"\xff" * 64
    path.write_bytes(raw)
    c = DiskCache(str(tmp_path), 1 << 30)
    try:
        c.present([cid((i).to_bytes(4, "big") * 8) for i in range(3000)])
    except Exception as e:
        assert isinstance(e, CafuseError)        # engine._disk_call only catches CafuseError


def test_a_prune_that_died_before_its_unlink_does_not_disable_the_cache(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    d = b"x" * 100
    c.put(cid(d), d); c.close()
    pack = tmp_path / "packs" / "1.pack"
    saved = pack.read_bytes()
    c = DiskCache(str(tmp_path), 1 << 30); c.prune(0); c.close()
    pack.write_bytes(saved)                       # the unlink never happened (crash)
    for _ in range(2):                            # every later process
        c = DiskCache(str(tmp_path), 1 << 30)
        c.put(cid(d), d)                          # CafuseError: File exists -> engine drops the cache
        c.close()


def test_a_full_disk_never_leaves_a_closed_fd_to_close_again(tmp_path, monkeypatch):
    # The pack is full, and there is no room for the next one: the next
    # put (the engine goes on using a full cache) must not close the old
    # pack's fd number again, which by then belongs to another file.
    c = DiskCache(str(tmp_path / "cache"), 16 * 1000)  # packs of 1000 bytes
    d1, d2, d3 = (bytes([n]) * 1000 for n in (1, 2, 3))
    c.put(cid(d1), d1)
    real_open = os.open

    def no_room(path, flags, *args):
        if str(path).endswith(".pack") and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", no_room)
    with pytest.raises(DiskFull):
        c.put(cid(d2), d2)
    monkeypatch.undo()
    other = tmp_path / "other"
    fd = os.open(other, os.O_CREAT | os.O_RDWR)  # likely the number just freed
    try:
        c.put(cid(d3), d3)                          # room again
        assert os.fstat(fd).st_ino == os.stat(other).st_ino
        assert c.get(cid(d3)) == d3
    finally:
        os.close(fd)
        c.close()


def test_a_pack_pruned_by_another_process_before_its_rows_are_committed(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    d = b"p" * 1000
    c.put(cid(d), d)                                # its row waits for the next commit
    for pack in (tmp_path / "packs").iterdir():
        pack.unlink()                               # `cafuse cache prune` elsewhere
    assert c.get(cid(d)) is None                    # a miss, and the pack is dropped
    c.flush()                                       # nothing left pointing into it
    c.put(cid(d), d)
    c.flush()
    assert c.get(cid(d)) == d
    c.close()


def test_calls_that_come_after_the_close_do_nothing(tmp_path):
    # A write the engine left to go on alone may reach the cache after its
    # close: it must neither fail nor leave a new pack behind.
    old, new = b"A" * 4096, b"B" * 4096
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(old), old)
    c.close()
    c.put(cid(new), new)
    c.flush()
    assert c.get(cid(old)) is None and c.present([cid(old)]) == set()
    c.close()
    assert os.listdir(tmp_path / "packs") == ["1.pack"]
    again = DiskCache(str(tmp_path), 1 << 30)
    assert again.get(cid(old)) == old and again.get(cid(new)) is None
    again.close()


def test_records_whose_rows_a_full_index_lost_give_their_room_back(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    c._db.execute("PRAGMA max_page_count = %d" % c._db.execute("PRAGMA page_count").fetchone()[0])
    with pytest.raises(CafuseError):
        for i in range(2000):
            d = i.to_bytes(4, "big") * 64
            c.put(cid(d), d)
        c.flush()
    listed = c._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM pack").fetchone()[0]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "packs").iterdir())
    assert on_disk == listed


def test_a_short_write_leaves_no_partial_record(tmp_path, monkeypatch):
    c = DiskCache(str(tmp_path), 1 << 30)
    d = b"x" * 1000
    c.put(cid(d), d); c.flush()
    size = (tmp_path / "packs" / "1.pack").stat().st_size
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: real_pwrite(fd, data[:100], at))
    with pytest.raises(DiskFull, match="short write"):
        c.put(cid(b"y" * 1000), b"y" * 1000)
    assert (tmp_path / "packs" / "1.pack").stat().st_size == size


def test_a_prune_frees_what_packs_take_on_disk(tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    d = b"x" * 1000
    c.put(cid(d), d); c.close()
    with open(tmp_path / "packs" / "1.pack", "ab") as f:
        f.write(b"\0" * 5000)                    # records whose rows were lost
    (tmp_path / "packs" / "7.pack").write_bytes(b"\0" * 3000)   # a pack no row lists
    c = DiskCache(str(tmp_path), 1 << 30)
    assert c.prune(0) == 1032 + 5000 + 3000
    c.close()
    assert list((tmp_path / "packs").iterdir()) == []


def test_a_cache_dir_that_is_no_cache_says_what_to_do(tmp_path):
    (tmp_path / "index.sqlite").write_bytes(b"garbage" * 1000)
    with pytest.raises(CafuseError, match="index.sqlite: file is not a database; it is only "
                       "a cache: remove the directory to start a new one"):
        DiskCache(str(tmp_path), 1 << 20)
    other = tmp_path / "other"
    other.mkdir()
    (other / "packs").write_bytes(b"")
    with pytest.raises(CafuseError, match="packs: File exists"):
        DiskCache(str(other), 1 << 20)


def test_a_prune_never_deletes_a_pack_made_meanwhile(tmp_path, monkeypatch):
    # A prune that died between its commit and its unlink left 1.pack with
    # no row; another process's new pack, made between the next prune's
    # look at the rows and its unlink, must not be taken for one such.
    old, new = b"o" * 4096, b"n" * 4096
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(old), old); c.close()
    c = DiskCache(str(tmp_path), 1 << 30)
    c._db.execute("DELETE FROM chunk"); c._db.execute("DELETE FROM pack"); c.close()
    pruner, writer = DiskCache(str(tmp_path), 1 << 30), DiskCache(str(tmp_path), 1 << 30)
    real_unlink, threads = os.unlink, []

    def write():
        writer.put(cid(new), new)
        writer.flush()

    def unlink(path):         # the writer makes its pack just before the prune's unlink
        if not threads:
            threads.append(threading.Thread(target=write))
            threads[0].start()
            threads[0].join(timeout=1)
        real_unlink(path)
    monkeypatch.setattr(os, "unlink", unlink)
    pruner.prune(1 << 30)
    threads[0].join(timeout=30)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert writer.get(cid(new)) == new


def _pruned_under(tmp_path, writer):
    """``writer`` has a pack of its own; another process prunes everything,
    and a third writes a chunk of its own (in a new pack)."""
    first = b"a" * 5000
    writer.put(cid(first), first); writer.flush()
    pruner = DiskCache(str(tmp_path), 1 << 30)
    pruner.prune(0); pruner.close()
    other, data = DiskCache(str(tmp_path), 1 << 30), os.urandom(3000)
    other.put(cid(data), data); other.close()
    return data


def test_pack_ids_are_not_reused_after_a_prune(tmp_path):
    a = DiskCache(str(tmp_path), 1 << 30)
    other = _pruned_under(tmp_path, a)
    mine = os.urandom(7000)
    a.put(cid(mine), mine)
    assert os.fstat(a._writing[1]).st_nlink == 1   # not its deleted pack
    a.close()
    c = DiskCache(str(tmp_path), 1 << 30)
    assert c.get(cid(mine)) == mine and c.get(cid(other)) == other
    usage = c.usage()
    assert usage.bytes == usage.on_disk == 2 * 32 + 3000 + 7000
    c.close()


def test_an_index_of_version_0_is_moved_over_without_losing_chunks(tmp_path):
    data = b"v0" * 1000
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(data), data); c.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")  # as version 0 made it
    db.executescript("""CREATE TABLE p0 (id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL,
                                         used REAL NOT NULL);
                        INSERT INTO p0 SELECT * FROM pack; DROP TABLE pack;
                        ALTER TABLE p0 RENAME TO pack; PRAGMA user_version = 0;""")
    db.close()
    c = DiskCache(str(tmp_path), 1 << 30)
    assert c.get(cid(data)) == data
    c.prune(0)
    more = b"v1" * 1000
    c.put(cid(more), more); c.flush()
    assert c._writing[0] == 2                    # not pack 1 again
    c.close()


def deleted_files_open(under) -> list[str]:
    """The deleted files under ``under`` that this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_a_prune_elsewhere_frees_the_packs_a_reader_holds_open(tmp_path):
    a = DiskCache(str(tmp_path), 1 << 30)
    x = DiskCache(str(tmp_path), 64 << 10 << 4)      # packs of 64 KiB
    chunks = [os.urandom(40_000) for _ in range(4)]
    for d in chunks:
        x.put(cid(d), d)
    x.close()
    assert all(a.get(cid(d)) == d for d in chunks)
    pruner = DiskCache(str(tmp_path), 1 << 30)
    pruner.prune(0); pruner.close()
    a._released -= 60                                # its next look is due
    assert a.flush_due()
    a.flush()                                        # as the engine's upkeep calls it
    held = deleted_files_open(tmp_path)
    a.close()
    assert held == []


@pytest.mark.parametrize("column, value", [
    ("offset", b"\x00\x9a\xef\x07"),   # one bit flipped in a record's serial type
    ("offset", 1.5), ("offset", -5), ("size", "abc"),
    ("size", 1 << 40), ("size", (1 << 63) - 1), ("pack", b"\x01"),
])
def test_a_damaged_row_is_a_miss(tmp_path, column, value):
    d = os.urandom(5000)
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(d), d); c.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute(f"UPDATE chunk SET {column} = ?", (value,)); db.commit(); db.close()
    c = DiskCache(str(tmp_path), 1 << 30)
    got = c.get(cid(d))    # (an offset read as 0 is right here: the only record)
    assert got == d or (got is None and c.present([cid(d)]) == set())  # its row gone
    c.close()


def test_damaged_pack_rows_and_stray_files_leave_stats_and_prune_working(tmp_path):
    d = os.urandom(5000)
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(d), d); c.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("UPDATE pack SET bytes = x'0001', used = 'then'"); db.commit(); db.close()
    for name in ("\u00b2.pack", "01.pack", "x.pack"):      # not packs of ours
        (tmp_path / "packs" / name).write_bytes(b"")
    c = DiskCache(str(tmp_path), 1 << 30)
    assert c.usage().entries == 1
    assert c.prune(0) == 32 + 5000
    c.close()
    assert sorted(os.listdir(tmp_path / "packs")) == ["01.pack", "x.pack", "\u00b2.pack"]


def test_another_database_is_not_taken_for_a_cache_to_look_at(tmp_path):
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("CREATE TABLE mine (x)"); db.commit(); db.close()
    with pytest.raises(CafuseError, match="no cafuse disk cache there"):
        DiskCache(str(tmp_path), 1 << 30, create=False)
    assert os.listdir(tmp_path) == ["index.sqlite"]
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs holding a cache of one chunk (closed: SQLite has
    removed its WAL files), then filled by something else."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", fs], check=True)
    try:
        data = os.urandom(100_000)
        c = DiskCache(str(fs / "cache"), 1 << 30)
        c.put(cid(data), data); c.close()
        fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError:
            pass
        os.close(fd)
        yield str(fs / "cache"), data
    finally:
        subprocess.run(["umount", "-l", fs], check=True)


def test_a_full_disk_still_lets_the_cache_be_read(full_disk):
    path, data = full_disk
    c = DiskCache(path, 1 << 30)
    assert c.read_only                               # SQLite could not make its files
    assert c.get(cid(data)) == data
    more = b"m" * 1000
    with pytest.raises(DiskFull, match="it is only read"):
        c.put(cid(more), more)
    c.close()


def test_a_prune_frees_room_on_a_full_disk(full_disk):
    path, data = full_disk
    c = DiskCache(path, 1 << 30)
    assert c.prune(0) == 32 + len(data)
    assert not c.read_only
    assert c.usage().entries == 0
    c.close()
    assert os.listdir(os.path.join(path, "packs")) == []


def test_a_prune_elsewhere_frees_the_pack_a_process_was_writing(tmp_path):
    a = DiskCache(str(tmp_path), 1 << 30)
    d = os.urandom(100_000)
    a.put(cid(d), d); a.flush()                      # then idle: no more puts
    pruner = DiskCache(str(tmp_path), 1 << 30)
    pruner.prune(0); pruner.close()
    a._released -= 60                                # its next look is due
    assert a.flush_due()
    a.flush()
    held = deleted_files_open(tmp_path)
    a.close()
    assert held == []


def test_an_index_opened_immutable_reads_misses_while_another_process_writes(
        tmp_path, monkeypatch):
    # Read only and immutable (its WAL files could not be made), while a
    # process that can write it commits and checkpoints: pages being
    # rewritten read as damaged, which must be misses, not errors.
    path = str(tmp_path)
    seed = DiskCache(path, 1 << 30)
    seed.put(cid(b"x"), b"x"); seed.close()
    stop, errors = threading.Event(), []

    def write():
        w, i = DiskCache(path, 1 << 30), 0
        while not stop.is_set():
            d = os.urandom(3000) + i.to_bytes(8, "big")
            w.put(cid(d), d)
            i += 1
        w.close()
    writer = threading.Thread(target=write)
    writer.start()
    cannot_write = sqlite3.OperationalError("attempt to write a readonly database")
    monkeypatch.setattr(DiskCache, "_open", lambda self, create: (_ for _ in ()).throw(
        cannot_write))
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                r = DiskCache(path, 1 << 30)
            except CafuseError:
                continue                             # the open read a torn page
            assert r.read_only
            ids = [row[0] for row in r._rows("SELECT id FROM chunk ORDER BY random() "
                                             "LIMIT 50", ())]
            try:
                r.present(ids)
                for c in ids:
                    got = r.get(c)
                    assert got is None or cid(got) == c
            except CafuseError as e:
                errors.append(str(e))
            r.close()
    finally:
        stop.set()
        writer.join()
    assert errors == []


def test_a_cache_that_cannot_be_written_while_another_process_has_it_open_is_read(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    ro.mkdir()
    d = b"seed" * 100
    seed = DiskCache(str(rw), 1 << 30)
    seed.put(cid(d), d); seed.close()
    holder = DiskCache(str(rw), 1 << 30)             # a mount elsewhere: WAL files there
    holder.put(cid(b"h"), b"h"); holder.flush()
    subprocess.run(["mount", "--bind", rw, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", ro], check=True)
        c = DiskCache(str(ro), 1 << 30)
        try:
            assert c.read_only and c.get(cid(d)) == d and c.get(cid(b"h")) == b"h"
            with pytest.raises(DiskFull, match="cannot be written; it is only read"):
                c.put(cid(b"new"), b"new")
        finally:
            c.close()
    finally:
        subprocess.run(["umount", "-l", ro], check=True)
        holder.close()



def test_a_write_sqlite_refuses_as_read_only_makes_the_cache_read_only(tmp_path):
    # SQLite may find out only when it writes that it cannot (a WAL index
    # it could not open to write): that is DiskFull, a warning, and the
    # cache is still read, not an error that (three in a row) closes it.
    d = b"kept" * 100
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(d), d); c.close()
    c = DiskCache(str(tmp_path), 1 << 30)
    real, refused = c._db, sqlite3.OperationalError("attempt to write a readonly database")
    refused.sqlite_errorcode = sqlite3.SQLITE_READONLY

    class Refusing:
        in_transaction = False

        def execute(self, sql, args=()):
            if sql.startswith(("INSERT", "UPDATE", "DELETE")):
                raise refused
            return real.execute(sql, args)

        def close(self):
            real.close()
    c._db = Refusing()
    with pytest.raises(DiskFull, match="it is only read"):
        c.put(cid(b"new"), b"new")
    assert c.read_only and c.get(cid(d)) == d
    c.close()


HOLD_THE_WRITE_LOCK = """import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE"); print("held", flush=True); time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")"""


def test_an_open_neither_waits_for_another_processes_write_nor_takes_it_for_read_only(
        tmp_path):
    c = DiskCache(str(tmp_path), 1 << 30)
    c.put(cid(b"kept"), b"kept"); c.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_WRITE_LOCK,
                               str(tmp_path / "index.sqlite"), "5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        c = DiskCache(str(tmp_path), 1 << 30)
        waited = time.monotonic() - start
        assert (c.read_only, c._immutable) == (None, False)
        assert c.get(cid(b"kept")) == b"kept"
        c.close()
    finally:
        holder.wait()
    assert waited < 2.5          # not the 5 s the lock is held
