"""The ``cafuse`` command line."""

import argparse
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import replace
import os
import re
import signal
import stat
import sys

import trio

from . import __version__, flags as ff
from .daemon import (MountRequest, check_mountpoint, run_background, run_foreground,
                     unmount)
from .diskcache import DiskCache, default_dir
from .errors import CafuseError, FormatError, UsageError
from .http import TLSOptions, shown
from .inputs import (DEFAULT_CACHE_BYTES, Input, Options, default_store, index_kind,
                     is_catar, kind_doubt, open_input, read_index)
from .listing import long_line, quote, size_text, timestamp
from .prefetch import prefetch
from .signals import stop_like_sigint, stopping_signal
from .store import HTTPOptions

DESCRIPTION = """\
cafuse reads casync archives lazily: a .caidx index (a directory tree) or a
.caibx index (one blob, such as a disk image), with its chunks in casync
chunk stores (directories or http(s) URLs).  Only the chunks a command needs
are fetched; each is verified against its id, and chunks from remote stores
are kept in a bounded disk cache shared by all cafuse processes.
"""

ENVIRONMENT = {
    "CASYNC_STORE": "  CASYNC_STORE         default chunk store when no -s is given\n",
    "CAFUSE_HTTP_HEADERS": "  CAFUSE_HTTP_HEADERS  extra HTTP request headers, one \"Name: value\" "
                           "per line\n                       (e.g. Authorization); never logged\n",
    "XDG_CACHE_HOME": "  XDG_CACHE_HOME       the default cache is $XDG_CACHE_HOME/cafuse, else\n"
                      "                       ~/.cache/cafuse (/var/cache/cafuse for root)\n",
    "CASYNC_COMPRESSED_CHUNK_SUFFIX": "  CASYNC_COMPRESSED_CHUNK_SUFFIX\n"
                                      "                       the suffix of chunk files in a "
                                      "store (default: .cacnk,\n"
                                      "                       as for casync)\n",
}
EPILOG = "environment:\n" + "".join(ENVIRONMENT.values())
_SOURCES = tuple(ENVIRONMENT)   # what commands that read archives heed

INDEX_HELP = ".caidx or .caibx (path or http(s) URL)"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header's name (RFC 9110 §5.6.2)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _directory_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty name is no directory")
    return text


def parse_size(text: str) -> int:
    """``512``, ``64K``, ``1.5G``, ``2GiB``: bytes, with powers of 1024."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in SIZE_UNITS and value[-1:] else ""
    try:
        number = float(value[:-1] if unit else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    size = number * SIZE_UNITS[unit]
    if not 0 <= size < math.inf:  # also NaN
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(size)


def _at_least(kind, low):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, not {text!r}")
        return value
    return parse


COUNT = _at_least(int, 0)
POSITIVE_COUNT = _at_least(int, 1)
SECONDS = _at_least(float, 0.001)


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not _TOKEN.fullmatch(name.strip()):
        raise argparse.ArgumentTypeError("not a header: expected 'Name: value', the name "
                                         "in ASCII letters, digits and !#$%&'*+-.^_`|~")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafuse", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cafuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = _command(commands, "info", "describe an index",
                    "Show an index's type, stream size, chunk statistics, digest "
                    "and feature flags.", environment=("CAFUSE_HTTP_HEADERS",))
    _add_http(info)
    info.add_argument("index", metavar="INDEX", help=".caibx, .caidx (path or URL) or .catar")
    info.set_defaults(run=cmd_info)

    ls = _command(commands, "ls", "list a directory of an archive",
                  "List PATH (default: the root) of a .caidx or .catar archive.")
    ls.add_argument("-l", "--long", action="store_true",
                    help="show mode, owner, group, size (or device numbers), "
                    "mtime in UTC with nanoseconds, and symlink targets")
    ls.add_argument("-R", "--recursive", action="store_true",
                    help="list everything below PATH, one relative path per line")
    _add_sources(ls)
    ls.add_argument("path", metavar="PATH", nargs="?", default="",
                    help="a path inside the archive")
    ls.set_defaults(run=cmd_ls)

    cat = _command(commands, "cat", "write a file or blob to stdout",
                   "Write the content of PATH in a .caidx or .catar archive, or "
                   "the whole blob of a .caibx, to stdout.")
    cat.add_argument("-o", "--output", metavar="FILE",
                     help="write to FILE instead (- is stdout): a regular file appears "
                     "only once complete; a FIFO or a device is written into")
    _add_sources(cat)
    cat.add_argument("path", metavar="PATH", nargs="?",
                     help="a file inside the archive (symlinks are followed); "
                     "not allowed for a .caibx")
    cat.set_defaults(run=cmd_cat)

    pre = _command(commands, "prefetch", "fill the cache with a whole index",
                   "Fetch every chunk of INDEX that the disk cache lacks, with a "
                   "progress line, and end with where the chunks came from.  A disk "
                   "cache that cannot be opened to write is an error.")
    _add_sources(pre, index_help=INDEX_HELP)
    pre.set_defaults(run=cmd_prefetch)

    mount = _command(commands, "mount", "mount an index with FUSE",
                     "Mount a .caidx as a read-only directory tree, or a .caibx as "
                     "a directory holding one read-only file named after the index "
                     "(loop-mountable with losetup -r).  Chunks are fetched when "
                     "read; the archive's modes are enforced by the kernel.  Runs "
                     "in the foreground until SIGINT/SIGTERM or 'cafuse umount'.")
    mount.add_argument("-o", dest="fuse_options", action="append", default=[],
                       metavar="OPTIONS", help="FUSE mount options for fusermount3, "
                       "comma-separated (e.g. allow_other, which for users needs "
                       "user_allow_other in /etc/fuse.conf); ro and "
                       "default_permissions are always set, rw and subtype= are "
                       "refused (the type is fuse.cafuse), and auto_unmount is "
                       "implied (a watchdog unmounts the mount if its process dies)")
    mount.add_argument("--background", action="store_true",
                       help="return once the mount is usable (exit 0), or with the "
                       "error (exit 1) leaving nothing mounted")
    mount.add_argument("--log-file", metavar="FILE",
                       help="where the mount logs (default: stderr in the "
                       "foreground, nowhere in the background)")
    _add_sources(mount, index_help=INDEX_HELP)
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    mount.set_defaults(run=cmd_mount)

    umount = _command(commands, "umount", "unmount a cafuse mount",
                      "Unmount the cafuse mount at MOUNTPOINT (through fusermount3, so "
                      "the user who mounted it may); a mount of any other type is "
                      "refused and left alone.", environment=())
    umount.add_argument("-l", "--lazy", action="store_true",
                        help="detach the mount now, even while files or directories "
                        "under it are in use; they keep working, and the mount "
                        "process ends once none is (fusermount3 -u -z)")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="where the archive is mounted")
    umount.set_defaults(run=cmd_umount)

    cache_env = ("XDG_CACHE_HOME",)
    cache = _command(commands, "cache", "inspect or shrink the disk cache",
                     "Show the disk cache's size, or prune it to a size.", cache_env)
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = _command(actions, "stats", "entries, bytes, age of the cache", None, cache_env)
    prune = _command(actions, "prune", "delete least recently used chunks",
                     "Delete least recently used chunks until the cache holds at "
                     "most SIZE.", cache_env)
    prune.add_argument("--max-size", type=parse_size, default=None, metavar="SIZE",
                       help="target size (default: --cache-size, "
                       f"{size_text(DEFAULT_CACHE_BYTES)}; 0 empties the cache)")
    for action in (stats, prune):
        _add_cache_dir(action)
    stats.set_defaults(run=cmd_cache_stats)
    prune.set_defaults(run=cmd_cache_prune)
    return parser


def _command(commands, name, summary, description, environment=_SOURCES):
    """A subcommand whose help lists the ``environment`` variables it heeds."""
    epilog = "".join(ENVIRONMENT[name] for name in environment)
    sub = commands.add_parser(name, help=summary, description=description,
                              epilog=epilog and "environment:\n" + epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("-v", "--verbose", action="count", default=0,
                     help="log more (-v: info, -vv: debug); warnings are always shown")
    sub.set_defaults(parser=sub)  # to say what is wrong with its own usage line
    return sub


def _add_cache_dir(parser):
    parser.add_argument("--cache-dir", metavar="DIR", type=_directory_name,
                        help=f"disk cache directory (default: {default_dir()})")
    parser.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE_BYTES,
                        metavar="SIZE", help="bound of the disk cache, e.g. 500M, 20G "
                        f"(default: {size_text(DEFAULT_CACHE_BYTES)})")


def _add_http(parser):
    group = parser.add_argument_group("HTTP(S) stores and index URLs")
    group.add_argument("--timeout", type=SECONDS, default=10.0, metavar="SECONDS",
                       help="deadline of one HTTP request, counted once it has "
                       "its place among the connections, connecting included "
                       "(default: 10)")
    group.add_argument("--retries", type=COUNT, default=3, metavar="N",
                       help="tries again after connection errors, timeouts, 5xx "
                       "and 429, with exponential back-off (or the server's "
                       "Retry-After, up to --timeout); a timed-out try goes "
                       "first to the next store, if any (default: 3)")
    group.add_argument("--connections", type=POSITIVE_COUNT, default=16, metavar="N",
                       help="requests in flight per store (default: 16)")
    group.add_argument("-H", "--header", type=parse_header, action="append", default=[],
                       metavar="'NAME: VALUE'", help="extra request header; repeatable")
    group.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify servers with")
    group.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM)")
    group.add_argument("--client-key", metavar="FILE",
                       help="client key (PEM), if not in --client-cert")
    group.add_argument("--insecure", action="store_true",
                       help="do not verify TLS certificates")


def _add_sources(parser, index_help=INDEX_HELP + ", or a .catar file"):
    parser.add_argument("-s", "--store", action="append", default=[], metavar="STORE",
                        help="chunk store: directory or http(s) URL; repeat to try "
                        "several in order (default: $CASYNC_STORE, else default.castr "
                        "next to INDEX)")
    parser.add_argument("--seed", action="append", default=[], metavar="INDEX[:FILE]",
                        help="read chunks that this local index describes from FILE "
                        "(default: INDEX without its suffix); repeatable")
    _add_cache_dir(parser)
    parser.add_argument("--no-cache", action="store_true", help="use no disk cache")
    parser.add_argument("--deadline", type=SECONDS, default=60.0, metavar="SECONDS",
                        help="give up on a chunk after this long, all stores and "
                        "retries included; a remote store that other stores follow "
                        "and that has not answered a request a quarter of it after "
                        "it got a connection is raced by the next stores (default: 60)")
    _add_http(parser)
    parser.add_argument("index", metavar="INDEX", help=index_help)


def http_options(args) -> HTTPOptions:
    headers = []  # those of the command line last: they win
    for number, line in enumerate(os.environ.get("CAFUSE_HTTP_HEADERS", "").splitlines(), 1):
        if line.strip():
            try:
                headers.append(parse_header(line))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"$CAFUSE_HTTP_HEADERS, line {number}: {e}") from None
    headers += args.header
    tls = TLSOptions(args.ca_file, args.client_cert, args.client_key, args.insecure)
    return HTTPOptions(connections=args.connections, timeout=args.timeout,
                       retries=args.retries, headers=tuple(headers), tls=tls)


def options(args) -> Options:
    return Options(stores=args.store, http=http_options(args), cache_dir=args.cache_dir,
                   cache_bytes=args.cache_size, no_cache=args.no_cache, seeds=args.seed,
                   deadline=args.deadline)


async def cmd_info(args) -> None:
    if is_catar(args.index):
        inp = await open_input(args.index)
        root = await inp.archive().root()
        await inp.aclose()
        _print("Type:          catar archive (local file)",
               f"Size:          {inp.source.size} bytes ({size_text(inp.source.size)})",
               *_flag_lines(root.feature_flags))
        return
    index = await read_index(args.index, http_options(args))
    kind = {"blob": "blob index (.caibx)",
            "tree": "archive index (.caidx)"}[index_kind(args.index, index)]
    doubt = kind_doubt(args.index, index)
    _print(f"Type:          {kind}" + (f"; {doubt}" if doubt else ""),
           f"Stream size:   {index.size} bytes ({size_text(index.size)})",
           f"Chunks:        {len(index)}{_chunk_size_stats(index)}",
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


@asynccontextmanager
async def opened(args, fill_cache=False):
    """The input named on the command line, with the engine's upkeep
    running beside the work; closed afterwards."""
    inp = await open_input(args.index, replace(options(args), fill_cache=fill_cache))
    try:
        async with trio.open_nursery() as nursery:
            if inp.index is not None:
                nursery.start_soon(inp.source.engine.maintain)
            yield inp
            nursery.cancel_scope.cancel()
    finally:
        await inp.aclose()


async def cmd_ls(args) -> None:
    async with opened(args) as inp:
        archive = inp.archive()
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
    async with opened(args) as inp:
        if inp.is_tree:
            offset, size = await _file_range(inp, args.path)
        elif args.path:
            raise UsageError(f"{shown(args.index)}: a blob index holds one blob; "
                             f"PATH '{args.path}' is not allowed")
        else:
            offset, size = 0, inp.source.size
        if args.output and args.output not in ("-", "/dev/stdout"):
            await _copy_to_file(inp, offset, size, args.output)
        else:
            out = _stdout()
            await inp.source.copy(offset, size, _named(out.write, "stdout"))
            _named(out.flush, "stdout")()


async def _file_range(inp: Input, path):
    if not path:
        raise UsageError(f"{inp.path}: name a file inside the archive to cat")
    entry = await inp.archive().resolve(path, follow=True)
    if not stat.S_ISREG(entry.mode):
        what = "is a directory" if entry.is_dir else "is not a regular file"
        raise UsageError(f"{path}: {what}")
    return entry.payload, entry.size


async def _copy_to_file(inp, offset, size, output):
    """A regular file (or a new one) appears only once complete: the bytes
    go to a temporary file beside it, renamed over it.  A device or a FIFO
    is written in place, and a symlink is followed, as ``cat >`` would."""
    try:
        mode = os.stat(output).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise CafuseError(f"{output}: {e.strerror}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise CafuseError(f"{output}: is a directory")
    if mode is not None and not stat.S_ISREG(mode):
        with _output(output, output) as f:
            await inp.source.copy(offset, size, _named(f.write, output))
            _named(f.flush, output)()
        return
    target = os.path.realpath(output)
    tmp = f"{target}.cafuse-{os.getpid()}.tmp"
    try:
        with _output(tmp, output) as f:
            await inp.source.copy(offset, size, _named(f.write, output))
            _named(f.flush, output)()
            if mode is not None:
                os.chmod(f.fileno(), stat.S_IMODE(mode))
        _named(os.rename, output)(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _output(path, name):
    try:
        return open(path, "wb")
    except OSError as e:
        raise CafuseError(f"{name}: {e.strerror}") from None


def _named(call, name):
    """``call``, with an OSError it raises told as one about ``name``."""
    def named(*args):
        try:
            return call(*args)
        except OSError as e:
            raise CafuseError(f"{name}: {e.strerror or e}") from None
    return named


def _stdout():
    if sys.stdout is None:
        raise CafuseError("stdout: not open")
    return sys.stdout.buffer


def _absolute(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)  # a URL of any scheme


def fuse_options(groups: list[str]) -> list[str]:
    """The -o options for fusermount3.  auto_unmount is what the mount's
    watchdog does already (and fusermount3 would stay to do it, holding up
    the mount); rw cannot be had."""
    wanted = [o for group in groups for o in group.split(",") if o]
    if "rw" in wanted:
        raise UsageError("-o rw: a cafuse mount is read-only")
    for option in wanted:
        if option.startswith("subtype="):
            raise UsageError(f"-o {option}: the type of a cafuse mount is fuse.cafuse "
                             f"(cafuse umount goes by it)")
    return [o for o in wanted if o != "auto_unmount"]


async def cmd_prefetch(args) -> None:
    if args.no_cache:
        raise UsageError("prefetch fills the disk cache; it cannot run with --no-cache")
    async with opened(args, fill_cache=True) as inp:
        if inp.index is None:
            raise UsageError(f"{shown(args.index)}: a local .catar needs no prefetch")
        report = await prefetch(inp.index, inp.source.engine, sys.stderr)
    _print(*report)


def cmd_mount(args) -> None:
    check_mountpoint(args.mountpoint)
    # A background mount leaves its directory (not to keep it busy): local
    # paths are made absolute first.
    args.index = _absolute(args.index)
    args.store = [_absolute(s) for s in args.store or [default_store(args.index)]]
    args.seed = [":".join(_absolute(p) if p else p for p in s.split(":", 1)) for s in args.seed]
    args.cache_dir = args.cache_dir and os.path.abspath(args.cache_dir)
    args.log_file = args.log_file and os.path.abspath(args.log_file)
    request = MountRequest(args.index, os.path.abspath(args.mountpoint), options(args),
                           fuse_options(args.fuse_options))
    if args.background:
        run_background(request, args.log_file)
    else:
        if args.log_file:
            _log_to(args.log_file)
        run_foreground(request)


def _log_to(path: str) -> None:
    """Log to the file ``path`` instead of stderr (which keeps the one
    error line a failed command ends with)."""
    try:
        handler = logging.FileHandler(path)
    except OSError as e:
        raise CafuseError(f"{path}: {e.strerror}") from None
    root = logging.getLogger()
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers = [handler]


def cmd_umount(args) -> None:
    unmount(args.mountpoint, args.lazy)


def _existing_cache(args) -> DiskCache:
    """The disk cache in --cache-dir, which must be one already: looking
    at a cache must not make one in whatever directory was named."""
    path = args.cache_dir or default_dir()
    if not os.path.exists(os.path.join(path, "index.sqlite")):
        raise CafuseError(f"{path}: no cafuse disk cache there")
    return DiskCache(path, args.cache_size, create=False)


async def cmd_cache_stats(args) -> None:
    cache = _existing_cache(args)
    usage = await trio.to_thread.run_sync(cache.usage)
    lines = [f"Cache:         {cache.path}",
             f"Entries:       {usage.entries} chunks in {usage.packs} pack files",
             f"Size:          {usage.bytes} bytes ({size_text(usage.bytes)}) of "
             f"{size_text(cache.max_bytes)} allowed"]
    if usage.on_disk > usage.bytes:
        lines.append(f"On disk:       {usage.on_disk} bytes ({size_text(usage.on_disk)}) in "
                     f"pack files, with records not yet committed by a process "
                     f"writing now, or left by one that died while writing; "
                     f"cafuse cache prune counts them")
    if usage.entries:
        lines += [f"Oldest use:    {timestamp(int(usage.oldest * 1e9))[:19]} UTC",
                  f"Newest use:    {timestamp(int(usage.newest * 1e9))[:19]} UTC"]
    cache.close()
    _print(*lines)


async def cmd_cache_prune(args) -> None:
    cache = _existing_cache(args)
    target = args.cache_size if args.max_size is None else args.max_size
    freed = await trio.to_thread.run_sync(cache.prune, target)
    usage = await trio.to_thread.run_sync(cache.usage)
    cache.close()
    _print(f"Freed {size_text(freed)}; the cache now holds {usage.entries} chunks, "
           f"{size_text(usage.bytes)}.")


def _print(*lines):
    text = "".join(line + "\n" for line in lines)
    out = _stdout()
    _named(out.write, "stdout")(text.encode("utf-8", "surrogateescape"))
    _named(out.flush, "stdout")()


def _fail(error) -> int:
    print(f"cafuse: error: {error}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    # Behave like cat(1) when the reader of a pipe goes away.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        words = sys.argv[1:] if argv is None else list(argv)
        before = words.index(args.command) > words.index(unknown[0]) \
            if unknown[0] in words else False
        (parser if before else args.parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="cafuse: %(levelname)s: %(message)s")
    try:
        if args.run in (cmd_mount, cmd_umount):
            args.run(args)  # they run trio themselves, after forking if asked
        else:
            stop_like_sigint(signal.SIGTERM, signal.SIGHUP)
            trio.run(args.run, args)
    except BaseException as e:  # noqa: B036 - every ending gets its exit status
        return _exit_status(e, getattr(args, "index", None))
    return 0


def _exit_status(error: BaseException, index: str | None) -> int:
    """The exit status for what ended a command, after its one error line
    (none for a signal); anything else is a bug, raised again.  A format
    error names the ``index`` (or .catar) it was found in."""
    leaves = list(_leaves(error))
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return 128 + stopping_signal()
    for leaf in leaves:
        if isinstance(leaf, FormatError) and leaf.source is None and index:
            return _fail(f"{shown(index)}: {leaf}")
        if isinstance(leaf, CafuseError):
            return _fail(leaf)
    for leaf in leaves:
        if isinstance(leaf, OSError):
            name = f"{leaf.filename}: " if leaf.filename else ""
            return _fail(f"{name}{leaf.strerror or leaf}")
    raise error


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


if __name__ == "__main__":
    sys.exit(main())
