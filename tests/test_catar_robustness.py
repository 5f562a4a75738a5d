"""Random, truncated and mutated catar bytes raise only FormatError."""

import os
import subprocess

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from cafuse import FormatError, NotFoundError
from cafuse.archive import Archive
from cafuse.siphash import siphash24

from memory import MemorySource

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/bin/casync") and os.environ.get("CI") != "true",
    reason="casync not installed")


@pytest.fixture(scope="module")
def catar_bytes(tmp_path_factory):
    """A small archive with directories, files, a symlink and an xattr."""
    base = tmp_path_factory.mktemp("fuzz")
    tree = base / "tree"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n")
    (tree / "dir" / "b").write_bytes(b"x" * 300)
    (tree / "dir" / "sub" / "c").write_bytes(b"")
    (tree / "link").symlink_to("dir/b")
    try:
        os.setxattr(tree / "a.txt", "user.k", b"v")
    except OSError:
        pass
    out = base / "t.catar"
    subprocess.run(["casync", "make", str(out), str(tree)], check=True,
                   capture_output=True, timeout=60)
    return out.read_bytes()


async def exercise(data: bytes):
    """Everything a reader does: walk, stat, read every file, resolve."""
    archive = Archive(MemorySource(data))
    root = await archive.root()
    async for _path, entry in archive.walk(root):
        if entry.payload is not None:
            await archive.read(entry, 0, entry.size)
    for path in ("a.txt", "dir/b", "dir/sub/c", "link", "nope", "dir/../a.txt"):
        try:
            await archive.resolve(path, follow=True)
        except NotFoundError:
            pass


def check(data: bytes):
    try:
        trio.run(exercise, data)
    except FormatError as e:
        assert "offset" in str(e) or e.offset is None


def test_the_original_is_readable(catar_bytes):
    trio.run(exercise, catar_bytes)


fuzz = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(data=st.data())
def test_truncated(catar_bytes, data):
    check(catar_bytes[:data.draw(st.integers(0, len(catar_bytes) - 1))])


@fuzz
@given(data=st.data())
def test_byte_mutations(catar_bytes, data):
    buf = bytearray(catar_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(buf) - 1))
        buf[position] = data.draw(st.integers(0, 255))
    check(bytes(buf))


@fuzz
@given(data=st.data())
def test_word_mutations(catar_bytes, data):
    # Sizes and offsets are le64 words: replace one with an extreme value.
    buf = bytearray(catar_bytes)
    position = data.draw(st.integers(0, len(buf) - 8))
    value = data.draw(st.sampled_from([0, 1, 15, 16, 63, 64, 2**63, 2**64 - 1,
                                       len(buf), len(buf) + 1]))
    buf[position:position + 8] = value.to_bytes(8, "little")
    check(bytes(buf))


@fuzz
@given(st.binary(max_size=600))
def test_random_bytes(data):
    check(data)


def test_a_name_is_not_said_missing_from_a_corrupt_goodbye_table(catar_bytes):
    # The root's item for a.txt made to point at dir: its search finds dir,
    # whose name differs, and a.txt would be cached as absent for a day.
    data = bytearray(catar_bytes)
    size = int.from_bytes(data[-16:-8], "little")
    start = len(data) - size
    items = {int.from_bytes(data[at + 16:at + 24], "little"): at
             for at in range(start + 16, len(data) - 24, 24)}
    a_txt, directory = items[siphash24(b"a.txt")], items[siphash24(b"dir")]
    data[a_txt:a_txt + 16] = data[directory:directory + 16]

    async def look(name):
        archive = Archive(MemorySource(bytes(data)))
        return await archive.lookup(await archive.root(), name)
    assert trio.run(look, b"dir").name == b"dir"
    for name in (b"a.txt", b"nope"):
        with pytest.raises(FormatError, match="overlap"):
            trio.run(look, name)
