"""File-only matplotlib figures, the one place fastcurv builds them.

A ``matplotlib.figure.Figure`` made directly (not through pyplot) is held by no pyplot state, so
there is nothing to close after saving it, and the process's matplotlib backend is never touched
(a notebook's inline figures keep working). matplotlib is the optional ``[plot]`` extra: without
it these return None and the callers skip their plots.
"""
from __future__ import annotations


def figure_class():
    """``matplotlib.figure.Figure``, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def file_figure(**kw):
    """``(figure, axes)``: a ``matplotlib.figure.Figure(**kw)`` with one axes, for saving to a file;
    None without matplotlib."""
    Figure = figure_class()
    if Figure is None:
        return None
    fig = Figure(**kw)
    return fig, fig.subplots()
