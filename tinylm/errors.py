"""The one exception type that entry points turn into a single line on stderr."""


class TinyLMError(Exception):
    """A problem the user can fix: bad input, bad config, bad file. Printed as one line."""
