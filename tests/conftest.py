"""Session fixtures: source trees and the archives the real casync makes."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import oracle  # noqa: E402
import trees  # noqa: E402

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
    require(os.path.exists("/usr/bin/casync"), "needs casync (make setup)")


@dataclass(frozen=True)
class Made:
    index: Path   # the .caidx/.caibx/.catar casync made
    store: Path   # its chunk store (unused for .catar)
    tree: Path    # what it was made from: a directory, or the blob file
    digest: str   # what casync make printed


_BUILDERS = {
    "full": ("tree", trees.build_full_tree),
    "edge": ("tree", trees.build_edge_tree),
    "bigdir": ("tree", trees.build_bigdir_tree),
    "sparse": ("tree", trees.build_sparse_tree),
    "blob1m": ("blob", lambda p: trees.build_blob(p, 1 << 20)),
    "blob5m": ("blob", lambda p: trees.build_blob(p, 5 << 20, "five")),
    "blob_empty": ("blob", lambda p: trees.build_blob(p, 0)),
    "blob_one": ("blob", lambda p: trees.build_blob(p, 1)),
}


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """``source(name)``: the path of a built source tree or blob (memoised)."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            require_root()
            _kind, builder = _BUILDERS[name]
            built[name] = builder(tmp_path_factory.mktemp("src") / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def casync_archive(source, tmp_path_factory):
    """``casync_archive(name, kind, compression, digest, chunk_size)`` → Made.

    ``kind`` is "caidx" or "catar" for trees, "caibx" for blobs.  Archives
    with the same arguments are made once per session.
    """
    made = {}

    def get(name, kind=None, compression="zstd", digest="sha512-256",
            chunk_size=None) -> Made:
        require_casync()
        kind = kind or ("caibx" if _BUILDERS[name][0] == "blob" else "caidx")
        key = (name, kind, compression, digest, chunk_size)
        if key not in made:
            src = source(name)
            out = tmp_path_factory.mktemp(f"{name}-{kind}")
            store = out / "default.castr"
            printed = oracle.make(out / f"{name}.{kind}", src,
                                  store=None if kind == "catar" else store,
                                  chunk_size=chunk_size, compression=compression,
                                  digest=digest)
            made[key] = Made(out / f"{name}.{kind}", store, src, printed)
        return made[key]

    return get
