"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (paths, names, options), not a bug."""
