"""The one exception type that entry points turn into a single line on stderr, and `brief` for what it quotes."""


class TinyLMError(Exception):
    """A problem the user can fix: bad input, bad config, bad file. Printed as one line."""


def brief(value, limit=80):
    """repr(value), cut to about `limit` characters: a value quoted from a stranger's file cannot make the line long.

    brief("x" * 5000) is its first 80 characters, "'xxx…x", then "… (5,002 characters)"; a short value is
    its repr. Line breaks inside the repr are escaped by repr itself, so the message stays on one line.
    """
    return shorten(repr(value), limit)


def shorten(text, limit=80):
    """text itself when it has at most `limit` characters, else its start, '…' and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"
