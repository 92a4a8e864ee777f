"""The one base class of user-facing errors.

Every error that bad input can cause (a missing file, an unknown option, a request the
model cannot edit) derives from :class:`AttentionDriftError`, and its message says what is
wrong and how to fix it, in the library's own terms (``workers must be >= 1``). The command
line prints these as one line; anything else is a bug and keeps its traceback.
"""


class AttentionDriftError(ValueError):
    """Bad input the user can fix; the message says what to change.

    A ``ValueError`` so that callers catching ``ValueError`` keep working. ``fields``: the
    library names (parameters, dataclass fields) the message mentions as words, e.g.
    ``("workers",)`` for ``"workers must be >= 1, got 0"``; the command line shows them as its
    flags (``--workers``).
    """

    def __init__(self, *args, fields: tuple[str, ...] = ()):
        super().__init__(*args)
        self.fields = tuple(fields)
