"""The sweep's figure: each trial's score against wall time and model size, the winner marked, labels placed so
that none overlaps another label, a point or the legend."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from transferkit.reports.plots import new_figure, save_figure


def sweep_png(points: Sequence[Mapping], metric: str, out: str | os.PathLike) -> Path:
    """A sweep's trials: ``metric`` against the wall time at which each finished, and against model size.

    ``points`` hold ``trial`` (its number), ``label`` (its model), ``value``, ``minutes`` (since the sweep
    began), ``params_m`` (millions) and ``winner`` (true for the sweep's winner, a red star labelled first).
    """
    return save_figure(sweep_figure(points, metric), out)


def sweep_figure(points: Sequence[Mapping], metric: str) -> Figure:
    """:func:`sweep_png`'s figure. Trials at one spot share a label (``3, 5: resnet50``); every label takes the
    first free place in its axes around its point, near to far (a leader line when far), so no label covers
    another or a point."""
    fig = new_figure(11, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    points = sorted(points, key=lambda p: not p.get("winner"))  # the winner's label gets the nearest place
    for ax, key, label in zip(axes, ("minutes", "params_m"), ("wall time when finished (min)", "parameters (M)")):
        for winner, style in ((False, {"color": "tab:blue", "label": "trial"}),
                              (True, {"color": "tab:red", "marker": "*", "s": 220, "zorder": 3, "label": "winner"})):
            chosen = [p for p in points if bool(p.get("winner")) == winner]
            if chosen:
                ax.scatter([p[key] for p in chosen], [p["value"] for p in chosen], **style)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.margins(0.12, 0.15)  # room for labels inside the axes
    axes[0].set_ylabel(f"{metric} (best checkpoint)")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"sweep: {len(points)} trials")
    fig.canvas.draw()  # the layout settles once; then labels are placed in its final pixels
    fig.set_layout_engine("none")
    for ax, key in zip(axes, ("minutes", "params_m")):
        spots: dict[tuple, dict[str, list]] = {}
        for point in points:
            spots.setdefault((point[key], point["value"]), {}).setdefault(point["label"], []).append(point)
        _place_labels(ax, [(xy, "; ".join(f"{', '.join(str(p['trial']) for p in same)}: {label}"
                                          for label, same in models.items()),
                            any(p.get("winner") for same in models.values() for p in same))
                           for xy, models in spots.items()])
    return fig


def _place_labels(ax, labels: Sequence[tuple], rings: int = 12) -> None:
    """Annotate each ``(xy, text, bold)`` at the first offset (rings of 8 directions, 8 to 8 + 12·rings points
    out) where its box stays in the axes and meets no label or point already there; a far one gets a leader."""
    renderer = ax.figure.canvas.get_renderer()
    taken = [_box_around(ax.transData.transform(xy), 5 * ax.figure.dpi / 72) for xy, _, _ in labels]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    directions = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
    offsets = [(dx * radius, dy * radius) for radius in (8 + 12 * ring for ring in range(rings)) for dx, dy in directions]
    for xy, text, bold in labels:
        for offset in offsets:  # none free within reach: the last, farthest one
            dx, dy = np.sign(offset)
            note = ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=7,
                               fontweight="bold" if bold else "normal", annotation_clip=False,
                               ha={1: "left", -1: "right"}.get(dx, "center"),
                               va={1: "bottom", -1: "top"}.get(dy, "center"))
            box = note.get_window_extent(renderer)
            inside = ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1)
            if (inside and not any(box.overlaps(other) for other in taken)) or offset == offsets[-1]:
                break
            note.remove()
        if max(map(abs, offset)) > offsets[0][0]:
            ax.annotate("", xy, xytext=offset, textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 3})
        taken.append(box)


def _box_around(centre, half: float):
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
