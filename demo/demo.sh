#!/bin/sh
# The cafuse demo: casync archives a small tree and a blob; cafuse reads them.
set -eu
cd "$(dirname "$0")/.."
CAFUSE=$PWD/.venv/bin/cafuse
WORK=$(mktemp -d /tmp/cafuse-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

show() { printf '\n$ %s\n' "$*"; "$@"; }

mkdir -p "$WORK/tree/docs" "$WORK/tree/bin"
printf 'hello from a casync archive\n' > "$WORK/tree/hello.txt"
printf '# notes\nread lazily, verified chunk by chunk\n' > "$WORK/tree/docs/notes.md"
ln -s ../hello.txt "$WORK/tree/docs/hello-link"
head -c 1048576 /dev/urandom > "$WORK/tree/random.bin"
printf '#!/bin/sh\necho hi\n' > "$WORK/tree/bin/hi"
chmod 755 "$WORK/tree/bin/hi"

echo "== building sample archives with casync (store: $WORK/default.castr)"
casync make --store="$WORK/default.castr" "$WORK/sample.caidx" "$WORK/tree" >/dev/null
casync make --store="$WORK/default.castr" "$WORK/sample.caibx" "$WORK/tree/random.bin" >/dev/null

cd "$WORK"
show "$CAFUSE" info sample.caidx
show "$CAFUSE" ls -l sample.caidx
show "$CAFUSE" ls -lR sample.caidx
show "$CAFUSE" cat sample.caidx hello.txt
show "$CAFUSE" cat sample.caidx docs/hello-link
show "$CAFUSE" info sample.caibx
printf '\n$ %s\n' "$CAFUSE cat sample.caibx | cmp - tree/random.bin"
"$CAFUSE" cat sample.caibx | cmp - tree/random.bin && echo "blob matches byte for byte"
