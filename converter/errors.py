"""The converter's one error type: a problem with the user's input, named in one line."""

from __future__ import annotations


class ConvertError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""
