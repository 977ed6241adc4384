"""Where the Snakemake workflow lives: the repository root (editable install / checkout) or the
copy shipped inside the package (``cutana/_workflow``, non-editable install)."""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def workflow_root() -> Path:
    """Return the directory holding ``Snakefile``, ``workflow/``, ``config/`` and ``profiles/``."""
    shipped = _PACKAGE_DIR / "_workflow"
    if (shipped / "Snakefile").is_file():
        return shipped
    checkout = _PACKAGE_DIR.parent.parent
    if (checkout / "Snakefile").is_file():
        return checkout
    raise FileNotFoundError(
        f"cutana's Snakemake workflow was not found in {shipped} nor {checkout}; "
        "reinstall the package with `pip install .` from a cutana checkout."
    )


def snakefile() -> Path:
    return workflow_root() / "Snakefile"


def config_schema_path() -> Path:
    return workflow_root() / "workflow" / "schemas" / "config.schema.yaml"


def catalogue_schema_path() -> Path:
    return workflow_root() / "workflow" / "schemas" / "catalogue.schema.yaml"
