"""Errors a user can fix (a bad file, a full disk): the CLI prints them as one `error:` line, rc 2."""


class UserError(Exception):
    """Base of errors whose message names the bad input and the fix; no traceback needed."""
