"""User-facing errors.

Every error a user can cause (bad flag, missing file, wrong model) is raised as
:class:`SDLMError` with a message that names the problem *and* the fix. The CLI
prints that one line and exits with status 2; library users catch the class.
"""


class SDLMError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""
