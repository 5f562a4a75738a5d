"""Disk cache faults found in review: pack ids reused after a prune, a
prune that died before its unlink, a corrupt index, a full disk."""

import errno
import hashlib
import os
import threading

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
    # no row; pack ids are reused, so another process's new pack 1, made
    # between the next prune's look at the rows and its unlink, must not
    # be taken for it.
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
