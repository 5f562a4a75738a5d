"""The ``cafuse`` command line."""

import argparse
import os
import signal
import stat
import sys

import trio

from . import __version__, flags as ff
from .errors import CafuseError, UsageError, first_error
from .inputs import Input, index_kind, is_catar, open_input, read_index
from .listing import long_line, quote, size_text

DESCRIPTION = """\
cafuse reads casync archives lazily: a .caidx index (a directory tree) or a
.caibx index (one blob, such as a disk image), with its chunks in casync
chunk stores.  Only the chunks a command needs are read, each is verified
against its id.
"""

STORE_HELP = ("chunk store directory; repeat to try several in order "
              "(default: $CASYNC_STORE, else default.castr next to INDEX)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafuse", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cafuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe an index",
                               description="Show an index's type, stream size, chunk "
                               "statistics, digest and feature flags.")
    info.add_argument("index", metavar="INDEX", help=".caibx, .caidx or .catar file")
    info.set_defaults(run=cmd_info)

    ls = commands.add_parser("ls", help="list a directory of an archive",
                             description="List PATH (default: the root) of a "
                             ".caidx or .catar archive.")
    ls.add_argument("-l", "--long", action="store_true",
                    help="show mode, owner, group, size (or device numbers), "
                    "mtime in UTC with nanoseconds, and symlink targets")
    ls.add_argument("-R", "--recursive", action="store_true",
                    help="list everything below PATH, one relative path per line")
    _add_common(ls)
    ls.add_argument("path", metavar="PATH", nargs="?", default="",
                    help="a path inside the archive")
    ls.set_defaults(run=cmd_ls)

    cat = commands.add_parser("cat", help="write a file or blob to stdout",
                              description="Write the content of PATH in a .caidx "
                              "or .catar archive, or the whole blob of a .caibx, "
                              "to stdout.")
    cat.add_argument("-o", "--output", metavar="FILE",
                     help="write to FILE instead; it appears only once complete")
    _add_common(cat)
    cat.add_argument("path", metavar="PATH", nargs="?",
                     help="a file inside the archive (symlinks are followed); "
                     "not allowed for a .caibx")
    cat.set_defaults(run=cmd_cat)
    return parser


def _add_common(parser):
    parser.add_argument("-s", "--store", action="append", default=[],
                        metavar="STORE", help=STORE_HELP)
    parser.add_argument("index", metavar="INDEX", help=".caidx, .caibx or .catar file")


async def cmd_info(args) -> None:
    if is_catar(args.index):
        inp = open_input(args.index)
        root = await inp.archive().root()
        _print("Type:          catar archive (local file)",
               f"Size:          {inp.source.size} bytes ({size_text(inp.source.size)})",
               *_flag_lines(root.feature_flags))
        return
    index = read_index(args.index)
    sizes = _chunk_size_stats(index)
    kind = {"blob": "blob index (.caibx)",
            "tree": "archive index (.caidx)"}[index_kind(args.index, index)]
    _print(f"Type:          {kind}",
           f"Stream size:   {index.size} bytes ({size_text(index.size)})",
           f"Chunks:        {len(index)}{sizes}",
           f"Chunker:       min {size_text(index.chunk_size_min)}, "
           f"avg {size_text(index.chunk_size_avg)}, max {size_text(index.chunk_size_max)}",
           f"Digest:        {index.digest}",
           *_flag_lines(index.feature_flags))


def _chunk_size_stats(index) -> str:
    if not len(index):
        return ""
    sizes = [index.chunk_size(i) for i in range(len(index))]
    return (f" (sizes: min {size_text(min(sizes))}, avg "
            f"{size_text(index.size / len(sizes))}, max {size_text(max(sizes))})")


def _flag_lines(value):
    return (f"Feature flags: {value:#018x}",
            f"Features:      {' '.join(ff.names(value)) or '(none)'}")


async def cmd_ls(args) -> None:
    archive = open_input(args.index, args.store).archive()
    entry = await archive.resolve(args.path)
    out = []
    if not entry.is_dir:
        out.append(_ls_line(args, entry, entry.name))
    elif args.recursive:
        async for path, child in archive.walk(entry):
            out.append(_ls_line(args, child, path))
    else:
        for child in await archive.listdir(entry):
            out.append(_ls_line(args, child, child.name))
    _print(*out)


def _ls_line(args, entry, path):
    return long_line(entry, path) if args.long else quote(path)


async def cmd_cat(args) -> None:
    inp = open_input(args.index, args.store)
    if inp.is_tree:
        offset, size = await _file_range(inp, args.path)
    elif args.path:
        raise UsageError(f"{args.index}: a blob index holds one blob; "
                         f"PATH '{args.path}' is not allowed")
    else:
        offset, size = 0, inp.source.size
    if args.output:
        await _copy_to_file(inp, offset, size, args.output)
    else:
        await inp.source.copy(offset, size, sys.stdout.buffer.write)
        sys.stdout.buffer.flush()


async def _file_range(inp: Input, path):
    if not path:
        raise UsageError(f"{inp.path}: name a file inside the archive to cat")
    entry = await inp.archive().resolve(path, follow=True)
    if not stat.S_ISREG(entry.mode):
        what = "is a directory" if entry.is_dir else "is not a regular file"
        raise UsageError(f"{path}: {what}")
    return entry.payload, entry.size


async def _copy_to_file(inp, offset, size, output):
    tmp = f"{output}.cafuse-{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            await inp.source.copy(offset, size, f.write)
        os.rename(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _print(*lines):
    text = "".join(line + "\n" for line in lines)
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


def _fail(error) -> int:
    print(f"cafuse: error: {error}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    # Behave like cat(1) when the reader of a pipe goes away.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        trio.run(args.run, args)
    except CafuseError as e:
        return _fail(e)
    except BaseExceptionGroup as group:
        found = first_error(group)
        if found is None:
            raise
        return _fail(found)
    except OSError as e:
        name = f"{e.filename}: " if e.filename else ""
        print(f"cafuse: error: {name}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
