"""One plotting helper for the PNGs ahn writes (matplotlib imported on use, Agg backend)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, imported on first use."""
    import matplotlib  # start-up time: about a second, and most runs that import this module never plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time

    return plt


def line_panels(path, title: str, panels, figsize=(11, 4)) -> None:
    """Side-by-side line plots written to ``path``.

    ``panels``: a list of ``(xlabel, ylabel, series, log2_x)`` where ``series`` maps a label
    to ``(xs, ys)``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, (xlabel, ylabel, series, log2_x) in zip(axes[0], panels):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    _finish(fig, plt, title, path)


def scatter_panels(path, title: str, panels, figsize=None) -> None:
    """Side-by-side scatter plots written to ``path``; ``panels``: ``(xlabel, ylabel, series)`` as in
    :func:`line_panels`."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (5.5 * len(panels), 4), squeeze=False)
    for ax, (xlabel, ylabel, series) in zip(axes[0], panels):
        for label, (xs, ys) in series.items():
            ax.scatter(xs, ys, s=12, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    _finish(fig, plt, title, path)


def _finish(fig, plt, title: str, path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
