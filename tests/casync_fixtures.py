"""Session fixtures: source trees and the archives the real casync makes."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import oracle
import trees

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, why: str):
    """Skip outside CI when ``condition`` fails; in CI, fail instead."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {why}")
        pytest.skip(why)


def require_root():
    require(os.geteuid() == 0, "needs root (mknod, chown, setcap)")


def require_casync():
    require(shutil.which("casync") is not None, "needs casync (make setup)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("root"):
        require_root()


@dataclass(frozen=True)
class Made:
    index: Path   # the .caidx/.caibx/.catar casync made
    store: Path   # its chunk store (unused for .catar)
    tree: Path    # what it was made from: a directory, or the blob file
    digest: str   # what casync make printed


# name: (builder, the file inside the tree that kind="caibx" archives)
_BUILDERS = {
    "full": (trees.build_full_tree, None),
    "edge": (trees.build_longname_tree, None),
    "names": (trees.build_names_tree, None),
    "bigdir": (trees.build_bigdir_tree, None),
    "twobigdirs": (lambda p: trees.build_bigdir_tree(p, 1500, ("a", "b")), None),
    "manydirs": (trees.build_manydirs_tree, None),
    "sparse": (trees.build_sparse_tree, "sparse"),
    "blob1m": (lambda p: trees.build_blob(p, 1 << 20), None),
    "blob5m": (lambda p: trees.build_blob(p, 5 << 20, "five"), None),
    "blob_empty": (lambda p: trees.build_blob(p, 0), None),
    "blob_one": (lambda p: trees.build_blob(p, 1), None),
}


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """``source(name)``: the path of a built source tree or blob (memoised)."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            require_root()
            builder, _member = _BUILDERS[name]
            built[name] = builder(tmp_path_factory.mktemp("src") / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def full_tree(source):
    return source("full")


@pytest.fixture(scope="session")
def longname_tree(source):
    """255-byte names and a pre-1970 mtime: ``casync extract`` fails on it."""
    return source("edge")


@pytest.fixture(scope="session")
def bigdir_tree(source):
    return source("bigdir")


@pytest.fixture(scope="session")
def sparse_tree(source):
    return source("sparse")


def _archive_input(source, name: str, kind: str) -> Path:
    """The directory (caidx, catar) or file (caibx) casync make is given."""
    path = source(name)
    member = _BUILDERS[name][1]
    if kind == "caibx" and path.is_dir():
        if member is None:
            raise ValueError(f"{name!r} is a tree without a blob for kind='caibx'")
        return path / member
    if kind != "caibx" and not path.is_dir():
        raise ValueError(f"{name!r} is a blob: use kind='caibx'")
    return path


@pytest.fixture(scope="session")
def casync_archive(source, tmp_path_factory):
    """``casync_archive(name, kind, compression, digest, chunk_size)`` → Made.

    ``kind`` is "caidx" or "catar" for trees, "caibx" for blobs (and for the
    2 GiB file of "sparse"); by default "caibx" for blobs, else "caidx".
    Each archive gets its own store; the same arguments make it only once
    per session.
    """
    made = {}

    def get(name, kind=None, compression="zstd", digest="sha512-256",
            chunk_size="64K") -> Made:
        require_casync()
        if kind is None:
            kind = "caidx" if source(name).is_dir() else "caibx"
        key = (name, kind, compression, digest, chunk_size)
        if key not in made:
            src = _archive_input(source, name, kind)
            out = tmp_path_factory.mktemp(f"{name}-{kind}")
            index = out / f"{name}.{kind}"
            store = out / "default.castr"
            printed = oracle.make(index, src, store=None if kind == "catar" else store,
                                  chunk_size=chunk_size, compression=compression,
                                  digest=digest)
            made[key] = Made(index, store, src, printed)
        return made[key]

    return get
