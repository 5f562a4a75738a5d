"""The fixtures build what they promise, and the oracle parses casync's output
right.  Only casync and the file system are used here, never cafuse."""

import hashlib
import os
import stat

import pytest

import oracle
import trees

pytestmark = pytest.mark.root


def sha512_256(data: bytes) -> str:
    return hashlib.new("sha512_256", data).hexdigest()


def archive_order(paths):
    """casync's order: depth first, siblings in strcmp order of their names."""
    return sorted(paths, key=lambda p: p.split(b"/"))


def test_full_tree_has_every_node_type_and_attribute(full_tree):
    fs = oracle.walk_fs(full_tree)
    assert {info["type"] for info in fs.values()} == set(oracle.MTREE_TYPES.values())
    assert (fs[b"empty"]["size"], fs[b"random.bin"]["size"]) == (0, 300_000)
    assert fs[b"longlink"]["target"] == b"x" * 1000
    assert (fs[b"null"]["rdev"], fs[b"loop0"]["rdev"]) == ((1, 3), (7, 0))
    assert os.lstat(full_tree / "hardlink").st_ino == os.lstat(full_tree / "hello.txt").st_ino
    modes = {name: stat.S_IMODE(fs[name]["mode"]) for name in (b"suid", b"sgid-dir", b"sticky")}
    assert modes == {b"suid": 0o4755, b"sgid-dir": 0o2755, b"sticky": 0o1777}
    assert (fs[b"big-ids"]["uid"], fs[b"big-ids"]["gid"]) == (70000, 70001)
    assert (fs[b"nobody"]["uid"], fs[b"nobody"]["gid"]) == (65534, 65534)
    assert fs[b"hello.txt"]["mtime_ns"] == trees.T2020 + 123456789
    assert set(fs[b"xattrs.txt"]["xattrs"]) == {
        "trusted.secret", "user.binary", "user.comment", "user.empty"}
    assert "security.capability" in fs[b"cap"]["xattrs"]
    assert "system.posix_acl_access" in fs[b"acl.txt"]["xattrs"]
    assert {"system.posix_acl_access", "system.posix_acl_default"} <= set(
        fs[b"dacl"]["xattrs"])
    assert max(p.count(b"/") for p in fs) == trees.DEEP_LEVELS + 1
    for name in trees.SORT_NAMES + trees.UNICODE_NAMES:
        assert fs[name.encode()]["type"] == "file"


def test_mtree_describes_every_source_path(casync_archive):
    made = casync_archive("full")
    listed = oracle.mtree(made.index, made.store)
    fs = oracle.walk_fs(made.tree)
    assert list(listed) == [b"."] + archive_order(fs)
    for path, info in fs.items():
        want = listed[path]
        assert want["type"] == info["type"], path
        assert int(want["mode"], 8) == stat.S_IMODE(info["mode"]), path
        assert (int(want["uid"]), int(want["gid"])) == (info["uid"], info["gid"]), path
        assert oracle.mtree_mtime_ns(want) == info["mtime_ns"], path
        assert want.get("link") == info.get("target"), path
        if "rdev" in info:
            assert want["device"] == "linux,%d,%d" % info["rdev"], path
        if info["type"] == "file":
            assert int(want["size"]) == info["size"], path
            assert want["sha512256digest"] == sha512_256((made.tree / os.fsdecode(path))
                                                         .read_bytes()), path
    assert (listed[b"nobody"]["uname"], listed[b"nobody"]["gname"]) == ("nobody", "nogroup")
    assert "uname" not in listed[b"big-ids"]


def test_list_matches_mtree(casync_archive):
    made = casync_archive("full")
    listed = oracle.list_(made.index, made.store)
    fs = oracle.walk_fs(made.tree)
    assert [path for path, _mode in listed] == list(oracle.mtree(made.index, made.store))
    for path, mode in listed[1:]:
        assert mode == stat.filemode(fs[path]["mode"]), path


def test_odd_names_are_unescaped(casync_archive):
    made = casync_archive("names", kind="catar")
    expected = [b"."] + archive_order(trees.ODD_NAMES + (b"link",))
    listed = oracle.mtree(made.index, None)
    assert list(listed) == expected
    assert listed[b"link"]["link"] == b"a target with spaces"
    assert [path for path, _mode in oracle.list_(made.index, None)] == expected


def test_extract_restores_the_source_tree(casync_archive, tmp_path):
    made = casync_archive("full")
    out = tmp_path / "out"
    oracle.extract(made.index, made.store, out)
    assert oracle.walk_fs(out) == oracle.walk_fs(made.tree)
    assert oracle.describe(out) == oracle.describe(made.tree)
    # casync has no hard links: both paths come back as separate files
    assert os.lstat(out / "hardlink").st_ino != os.lstat(out / "hello.txt").st_ino


def test_chattr_flag_survives_where_supported(full_tree, casync_archive, tmp_path):
    if not oracle.chattr(full_tree / "noatime.txt"):
        pytest.skip("the file system of the tmp dir has no chattr +A")
    made = casync_archive("full")
    oracle.extract(made.index, made.store, tmp_path / "out")
    assert oracle.chattr(tmp_path / "out" / "noatime.txt") == 0x80  # FS_NOATIME_FL


def test_digests(casync_archive):
    catar = casync_archive("full", kind="catar")
    caidx = casync_archive("full")
    assert catar.digest == sha512_256(catar.index.read_bytes())
    assert caidx.digest == catar.digest == oracle.digest(caidx.index, caidx.store)
    assert oracle.digest(caidx.index, caidx.store, "hello.txt") == sha512_256(
        b"hello casync\n")
    blob = casync_archive("blob1m")
    assert blob.digest == sha512_256(blob.tree.read_bytes())
    assert casync_archive("blob1m", digest="sha256").digest == hashlib.sha256(
        blob.tree.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,size", [("blob1m", 1 << 20), ("blob_one", 1),
                                       ("blob_empty", 0)])
def test_blobs_extract_to_their_source(casync_archive, tmp_path, name, size):
    made = casync_archive(name, chunk_size="16K")
    assert made.index.suffix == ".caibx" and made.tree.stat().st_size == size
    assert made.tree.read_bytes() == trees.pseudo_random(size, "blob")
    oracle.extract(made.index, made.store, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == made.tree.read_bytes()


def test_longname_tree_is_archived_but_not_extractable(casync_archive, tmp_path):
    made = casync_archive("edge")
    listed = oracle.mtree(made.index, made.store)
    assert list(listed) == [b".", b"future.txt", b"n" * 255, b"old.txt",
                            "ü".encode() * 127]
    assert oracle.mtree_mtime_ns(listed[b"old.txt"]) == trees.PRE_1970
    assert listed[b"old.txt"]["time"] == "18131124874.209551616"  # wrapped mod 2**64
    assert oracle.mtree_mtime_ns(listed[b"future.txt"]) == trees.AFTER_2262
    assert listed[b"future.txt"]["time"] == "10413792000.500000000"  # also 2**63 or more
    with pytest.raises(RuntimeError, match="File name too long"):
        oracle.extract(made.index, made.store, tmp_path / "out")


def test_bigdir(casync_archive):
    made = casync_archive("bigdir")
    listed = oracle.mtree(made.index, made.store)
    assert len(listed) == 2 + 10_000
    assert listed[b"big/file09999"]["size"] == "5"


@pytest.mark.slow
def test_sparse_blob(casync_archive):
    made = casync_archive("sparse", kind="caibx")
    assert made.tree.name == "sparse" and made.tree.stat().st_size == trees.SPARSE_SIZE
    with open(made.tree, "rb") as f:
        for offset, data in trees.SPARSE_MARKS.items():
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(0)
        assert made.digest == hashlib.file_digest(f, "sha512_256").hexdigest()
