"""The error types cafuse raises.

Every error carries a one-line message that names the file, chunk, path or
offset at fault, so the CLI can print ``str(error)`` and exit.
"""


class CafuseError(Exception):
    """Base of every error cafuse reports to a user."""


class FormatError(CafuseError):
    """Malformed index, catar or chunk bytes.

    ``offset`` is the byte position of the fault in the object being parsed
    (the index file, or the catar stream), or None when it has none;
    ``source`` names that object, if the message does.
    """

    def __init__(self, message: str, offset: int | None = None, source: str | None = None):
        if offset is not None:
            message = f"{message} (at offset {offset})"
        if source is not None:
            message = f"{source}: {message}"
        super().__init__(message)
        self.offset = offset
        self.source = source

    def named(self, source: str) -> "FormatError":
        """This error, said of ``source`` (the file it was found in)."""
        error = FormatError(str(self), source=source)
        error.offset = self.offset
        return error


class ChunkError(CafuseError):
    """A chunk that no store could deliver with the right content."""


class ChunkUnanswered(ChunkError):
    """A chunk that no store delivered because a store that may have it gave
    no answer (its tries timed out or failed: no connection, 5xx): asking
    again at once would wait for that store again."""


class ChunkTimeout(ChunkUnanswered):
    """A chunk that no store delivered within its deadline."""


class NotFoundError(CafuseError):
    """A path that does not exist in an archive."""


class UsageError(CafuseError):
    """A request that does not fit the input (e.g. a PATH for a blob)."""


def first_error(group: BaseExceptionGroup) -> CafuseError | None:
    """The first CafuseError inside ``group`` (nested groups included)."""
    for exc in group.exceptions:
        if isinstance(exc, CafuseError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_error(exc)
            if found is not None:
                return found
    return None


class single_errors:
    """Context manager: when a nursery fails with a group holding a
    CafuseError, raise that one error instead, so callers see the same
    error types whether one task or many did the work."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, BaseExceptionGroup):
            found = first_error(exc)
            if found is not None:
                raise found from None
        return False
