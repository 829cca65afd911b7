"""User-facing errors.

`UserError` is what the CLI turns into one line on stderr and exit status 2: bad input, not a
bug.  Everything else propagates with its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the bad value and what would be valid."""
