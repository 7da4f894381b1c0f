"""The one exception type for mistakes a user can fix."""


class MergeHooksError(Exception):
    """A user error: bad recipe, bad input model, bad output location.

    The message says what is wrong and how to fix it. The CLI prints it as
    ``error: <message>`` and exits with status 2; nothing has been written when it is raised.
    """
