"""fastfed's exception types."""

from __future__ import annotations

__all__ = ["DecodeError"]


class DecodeError(ValueError):
    """A compressed payload is malformed, truncated, corrupted or of an unknown format version."""
