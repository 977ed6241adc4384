"""Exception types of cutana.

Every error raised for bad input derives from :class:`CutanaError` and carries a message that
names the file, row, column, key or value at fault and says how to fix it.
"""


class CutanaError(Exception):
    """Base class of every error cutana raises on purpose."""


class ConfigValidationError(CutanaError, ValueError):
    """A configuration key has a bad value (names the key, the value and the allowed range)."""


class CatalogueValidationError(CutanaError, ValueError):
    """The source catalogue is malformed (names the row(s), column, value and the fix)."""


class FitsValidationError(CutanaError):
    """A FITS file cannot be used (missing, unreadable, no image data, no celestial WCS, ...)."""


class NoOverlapError(CutanaError):
    """A stamp does not overlap its image at all."""
