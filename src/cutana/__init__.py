"""cutana: cut normalised image stamps out of large FITS survey mosaics."""

from .config import get_default_config, load_config_toml, save_config_toml
from .exceptions import (
    CatalogueValidationError,
    ConfigValidationError,
    CutanaError,
    FitsValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "CatalogueValidationError",
    "ConfigValidationError",
    "CutanaError",
    "FitsValidationError",
    "Orchestrator",
    "get_default_config",
    "load_config_toml",
    "save_config_toml",
]


def __getattr__(name):
    # The Orchestrator pulls in subprocess/psutil machinery; import it on first use only.
    if name == "Orchestrator":
        from .orchestrator import Orchestrator

        return Orchestrator
    raise AttributeError(name)
