"""cafuse: lazy, verified access to casync archives."""

from .errors import CafuseError, ChunkError, FormatError, NotFoundError, UsageError

__version__ = "0.1.0"
__all__ = ["CafuseError", "ChunkError", "FormatError", "NotFoundError", "UsageError",
           "__version__"]
