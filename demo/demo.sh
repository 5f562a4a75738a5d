#!/bin/sh
# The cafuse demo: casync archives a sample tree; a local HTTP server serves
# its index and chunk store; cafuse mounts it lazily, lists it, reads a file,
# and says how few of the chunks that took.  Everything lives in a temporary
# directory, removed at the end (the mount and the server too).
set -eu
cd "$(dirname "$0")/.."
CAFUSE=$PWD/.venv/bin/cafuse
PYTHON=$PWD/.venv/bin/python
WORK=$(mktemp -d /tmp/cafuse-demo.XXXXXX)
SERVER=
cleanup() {
    if grep -q " $WORK/mnt " /proc/self/mountinfo; then "$CAFUSE" umount "$WORK/mnt" || true; fi
    [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

show() { printf '\n$ %s\n' "$*"; "$@"; }

echo "== a sample tree: text files, a symlink, 21 MB of data in 3 big files"
mkdir -p "$WORK/tree/docs" "$WORK/tree/bin" "$WORK/tree/data" "$WORK/mnt"
printf 'hello from a casync archive\n' > "$WORK/tree/hello.txt"
printf '# notes\nread lazily, verified chunk by chunk\n' > "$WORK/tree/docs/notes.md"
ln -s ../hello.txt "$WORK/tree/docs/hello-link"
printf '#!/bin/sh\necho hi\n' > "$WORK/tree/bin/hi"
chmod 755 "$WORK/tree/bin/hi"
for n in 1 2 3; do head -c 7000000 /dev/urandom > "$WORK/tree/data/blob$n.bin"; done

echo "== casync make (index and store under $WORK/www)"
mkdir -p "$WORK/www"
casync make --store="$WORK/www/default.castr" "$WORK/www/sample.caidx" "$WORK/tree" >/dev/null
CHUNKS=$(find "$WORK/www/default.castr" -name '*.cacnk' | wc -l)

PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$PORT" \
    >/dev/null 2>"$WORK/http.log" &
SERVER=$!
URL=http://127.0.0.1:$PORT/sample.caidx
"$PYTHON" -c "import socket,sys,time
for _ in range(100):
    try: socket.create_connection(('127.0.0.1', $PORT)).close(); sys.exit(0)
    except OSError: time.sleep(0.05)
sys.exit('the demo HTTP server did not start')"

show "$CAFUSE" info "$URL"
show "$CAFUSE" mount --background --cache-dir "$WORK/cache" "$URL" "$WORK/mnt"
show ls -l "$WORK/mnt" "$WORK/mnt/docs"
show cat "$WORK/mnt/docs/hello-link"
show ls -l "$WORK/mnt/data"
FETCHED=$(grep -c '\.cacnk' "$WORK/http.log" || true)
printf '\n== chunks fetched so far: %s of %s (the 21 MB of data were never read)\n' \
    "$FETCHED" "$CHUNKS"
show "$CAFUSE" umount "$WORK/mnt"
