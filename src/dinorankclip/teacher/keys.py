"""Formatting of state-dict key lists for error messages."""

MAX_KEYS_IN_MESSAGE = 20


def format_keys(keys: list[str]) -> str:
    """Join up to ``MAX_KEYS_IN_MESSAGE`` keys with commas and count the rest."""
    listed = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    if len(keys) > MAX_KEYS_IN_MESSAGE:
        listed += f", ... ({len(keys) - MAX_KEYS_IN_MESSAGE} more)"
    return listed
