"""cutana_ui: the step-by-step Jupyter/Voila interface of cutana.

Usage in JupyterLab or a Voila page::

    import cutana_ui
    cutana_ui.start()            # or cutana_ui.start(ui_scale=0.6) for a smaller UI

Needs the ``[ui]`` extra (ipywidgets; voila for the stand-alone page).
"""

from __future__ import annotations

from .app import CutanaApp

__all__ = ["CutanaApp", "start"]


def start(ui_scale: float = 1.0, catalogue: str | None = None, **kwargs) -> CutanaApp:
    """Build the cutana UI and display it in the current notebook or Voila page.

    Parameters
    ----------
    ui_scale : float
        Scales fonts, widget sizes and preview images (e.g. 0.6 for a compact UI).
    catalogue : str, optional
        Catalogue to pre-fill and load; default ``$CUTANA_UI_CATALOGUE`` if set.
    **kwargs
        Passed to :class:`CutanaApp` (``output_dir``, ``config``, ``debounce_seconds``, ...).

    Returns
    -------
    CutanaApp
        The application; its widgets and methods can also be used from code.
    """
    app = CutanaApp(catalogue=catalogue, ui_scale=ui_scale, **kwargs)
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return app
    display(app.widget)
    return app
