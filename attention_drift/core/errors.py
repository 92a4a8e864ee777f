"""The one base class of user-facing errors.

Every error that bad input can cause (a missing file, an unknown option, a request the
model cannot edit) derives from :class:`AttentionDriftError`, and its message says what is
wrong and how to fix it. The command line prints these as one line; anything else is a bug
and keeps its traceback.
"""


class AttentionDriftError(ValueError):
    """Bad input the user can fix; the message says what to change.

    A ``ValueError`` so that callers catching ``ValueError`` keep working.
    """
