"""Opening casync-made archives with cafuse, from synchronous tests."""

import trio

from cafuse.inputs import Options, open_input


def open_made(made, **options):
    """An Input for a fixture archive; the disk cache is off unless asked."""
    options.setdefault("no_cache", True)
    stores = [str(made.store)] if made.store.exists() else []
    return trio.run(open_input, str(made.index), Options(stores=stores, **options))
