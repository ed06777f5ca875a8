"""PNG figures for runs and evaluations: confusion matrix, reliability, worst errors, curves, filters,
augmentation previews.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display,
safe in worker threads) and written through :func:`transferkit.core.fileio.atomic_path`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transferkit.core.fileio import atomic_path

MAX_ANNOTATED_CLASSES = 30
MARK_STYLES = (("x", "black"), ("o", "red"), ("^", "darkorange"), ("s", "purple"))
CURVE_PANELS = (
    ("loss", ("train_loss", "val_loss")),
    ("accuracy", ("train_accuracy", "val_accuracy", "val_macro_f1")),
    ("learning rate", ("lr",)),
)


def confusion_matrix_png(cm, class_names: Sequence[str], out: str | os.PathLike, normalize: bool = True,
                         subject: str = "") -> Path:
    """Rows are true classes; ``normalize`` divides each row by its support (recall on the diagonal).

    ``subject`` (every figure of an evaluation takes one): the model and split shown, e.g. ``run-a · val``,
    put in the title so a PNG seen alone — in the MLflow artifact view, in a report — says what it shows.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(cm, dtype=np.float64)
    if normalize:
        support = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    size = min(4 + 0.45 * len(class_names), 24)
    fig = new_figure(size, size * 0.85)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=True, xticks_rotation="vertical",
        include_values=len(class_names) <= MAX_ANNOTATED_CLASSES, values_format=".2f" if normalize else ".0f",
    )
    ax.set_title(_titled("confusion matrix (row-normalized)" if normalize else "confusion matrix (counts)", subject))
    return save_figure(fig, out)


def reliability_png(y_true, probs, out: str | os.PathLike, subject: str = "") -> Path:
    """Accuracy against confidence per bin, with the number of samples per bin below; ECE in the title.

    Each bin is a blue accuracy bar; its mean confidence is a black tick across the bar and the gap between
    them is hatched (red: over-confident, orange: under-confident), so the two never hide one another.
    """
    from matplotlib.patches import Patch

    from transferkit.reports.metrics import calibration_bins, expected_calibration_error

    bins = calibration_bins(y_true, probs)
    edges, count = bins["edges"], bins["count"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) * 0.8
    used = count > 0
    accuracy, confidence = bins["accuracy"][used], bins["confidence"][used]
    fig = new_figure(5.5, 6.5)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[used], accuracy, width=width, color="tab:blue", alpha=0.8)
    over = confidence > accuracy
    ax.bar(centres[used], np.abs(confidence - accuracy), bottom=np.minimum(accuracy, confidence), width=width,
           facecolor="none", hatch="///", edgecolor=np.where(over, "tab:red", "tab:orange"), linewidth=1)
    ax.hlines(confidence, centres[used] - width / 2, centres[used] + width / 2, color="black", linewidth=2)
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set(ylim=(0, 1.02), ylabel="accuracy", title=_titled(
        f"reliability (ECE {expected_calibration_error(y_true, probs):.3f}, n={int(count.sum())})", subject))
    ax.legend(handles=[Patch(color="tab:blue", alpha=0.8, label="accuracy in bin"),
                       ax.plot([], [], color="black", linewidth=2, label="mean confidence in bin")[0],
                       Patch(facecolor="none", hatch="///", edgecolor="tab:red", label="over-confident gap"),
                       Patch(facecolor="none", hatch="///", edgecolor="tab:orange", label="under-confident gap"),
                       ax.plot([], [], "--", color="gray", label="perfect calibration")[0]],
              loc="upper left", fontsize=8)
    hist.bar(centres, count, width=width, color="gray")
    for x, n in zip(centres[used], count[used]):
        hist.annotate(str(int(n)), (x, n), ha="center", va="bottom", fontsize=7)
    hist.set(xlim=(0, 1), ylim=(0, max(count.max(), 1) * 1.25), xlabel="confidence (max probability)", ylabel="images")
    return save_figure(fig, out)


def error_gallery_png(items: Sequence[Mapping], out: str | os.PathLike, class_names: Sequence[str] | None = None,
                      columns: int = 4, subject: str = "") -> Path:
    """Thumbnails of ``items`` (``{path, true, pred, prob}``) titled true → pred (prob).

    ``true``/``pred`` may be class indices (named through ``class_names``) or names. An unreadable image
    is shown as an empty tile, and no items gives a figure that says so, so the file always exists.
    """
    def name(label):
        return class_names[label] if class_names is not None and isinstance(label, (int, np.integer)) else str(label)

    if not items:
        fig = new_figure(4, 1.5)
        fig.text(0.5, 0.5, _titled("no misclassified images", subject), ha="center", va="center")
        return save_figure(fig, out)
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    fig = new_figure(3 * columns, 3.2 * rows)
    for i, item in enumerate(items):
        _thumbnail(fig.add_subplot(rows, columns, i + 1), item["path"],
                   f"{name(item['true'])} → {name(item['pred'])} ({float(item['prob']):.2f})")
    fig.suptitle(_titled("most confident errors (true → predicted)", subject))
    return save_figure(fig, out)


def _thumbnail(ax, path, caption: str) -> None:
    """One gallery tile: the image (or "unreadable"), the caption and the file name."""
    from transferkit.data.decode import load_image

    try:
        ax.imshow(load_image(path, min_short_side=256))
    except Exception:  # the gallery must not fail because one file vanished or is corrupt
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{caption}\n{Path(str(path)).name}", fontsize=8)
    ax.axis("off")


def suspect_gallery_png(sections: Mapping[str, Sequence], out: str | os.PathLike, columns: int = 6) -> Path:
    """One block of thumbnails per section title; empty sections say so.

    A section's entries are items ``{path, caption}``, which flow row by row, or groups (lists of items, e.g.
    every member of a near-duplicate group, train and val side alike), each on rows of its own.
    """
    layout = []
    for title, entries in sections.items():
        cells, count = _gallery_cells(entries, columns)
        layout.append((title, cells, count, max((row for row, _, _ in cells), default=-1) + 1))
    heights = [2.7 * rows + 0.4 for *_, rows in layout]
    fig = new_figure(2.4 * columns, sum(heights))
    for block, (title, cells, count, rows) in zip(fig.subfigures(len(layout), 1, height_ratios=heights)
                                                  if len(layout) > 1 else [fig], layout):
        block.suptitle(f"{title}: {count or 'none'}", fontsize=10, x=0.01, ha="left")
        for row, column, item in cells:
            _thumbnail(block.add_subplot(rows, columns, row * columns + column + 1), item["path"], item["caption"])
    return save_figure(fig, out)


def _gallery_cells(entries: Sequence, columns: int) -> tuple[list[tuple[int, int, Mapping]], int]:
    """``([(row, column, item)], number of entries)``: items flow on, a group starts (and ends) its own rows."""
    cells, row, column = [], 0, 0
    for entry in entries:
        group = not isinstance(entry, Mapping)
        if group and column:
            row, column = row + 1, 0
        for item in entry if group else [entry]:
            if column == columns:
                row, column = row + 1, 0
            cells.append((row, column, item))
            column += 1
        if group:
            row, column = row + 1, 0
    return cells, len(entries)


def embedding_map_png(points: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                      marks: Mapping[str, Sequence[int]], out: str | os.PathLike) -> Path:
    """2-D projected embeddings ``[N, 2]`` coloured by class; rows listed in ``marks`` get one marker per kind."""
    points, labels = np.asarray(points, dtype=np.float64), np.asarray(labels)
    fig = new_figure(9, 7.5)
    ax = fig.add_subplot()
    cmap = "tab10" if len(class_names) <= 10 else "tab20"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, vmin=-0.5,
                         vmax=max(len(class_names), 10 if cmap == "tab10" else 20) - 0.5, s=10, alpha=0.6,
                         linewidths=0)
    for (kind, rows), (marker, colour) in zip(marks.items(), MARK_STYLES):
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            colours = {"color": colour} if marker == "x" else {"facecolors": "none", "edgecolors": colour}
            ax.scatter(points[rows, 0], points[rows, 1], marker=marker, s=60, linewidths=1.2,
                       label=f"{kind} ({len(rows)})", **colours)
    if len(class_names) <= MAX_ANNOTATED_CLASSES:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=scatter.cmap(scatter.norm(i)), label=name)
                   for i, name in enumerate(class_names)]
        fig.legend(handles=handles, title="class", loc="outside right upper", fontsize=8)
    if any(len(rows) for rows in marks.values()):
        fig.legend(*ax.get_legend_handles_labels(), title="suspects", loc="outside right lower", fontsize=8)
    ax.set(title=f"embedding map ({len(points)} images, 2-D projection)", xticks=[], yticks=[])
    return save_figure(fig, out)


def training_curves_png(rows: Sequence[Mapping], out: str | os.PathLike, *, best_epoch: int | None = None,
                        title: str = "") -> Path:
    """Loss, accuracy (train, val) / val macro-F1 and learning rate per epoch, the kept epoch marked.

    ``rows`` are per-epoch dicts (e.g. read back from metrics.csv, so values may be strings or blank);
    keys that are absent or empty are simply not drawn. Epoch 0 (LP-FT's probe: val scores only) is a point
    like any other, so the saved model is on the chart even when it is the probe. Epoch ticks are integers.
    """
    from matplotlib.ticker import MaxNLocator

    epochs = [_number(row.get("epoch")) for row in rows]
    fig = new_figure(13, 3.8)
    for ax, (panel, keys) in zip(fig.subplots(1, len(CURVE_PANELS)), CURVE_PANELS):
        for key in keys:
            points = [(e, _number(row.get(key))) for e, row in zip(epochs, rows)]
            points = [(e, v) for e, v in points if e is not None and v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", linestyle=":", label=f"kept: epoch {best_epoch}")
        ax.set(title=panel, xlabel="epoch (0: LP-FT's probe)" if 0 in epochs else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def lr_find_png(lrs: Sequence[float], losses: Sequence[float], suggestion: float, out: str | os.PathLike) -> Path:
    """The LR range test: smoothed training loss against LR (log scale), the suggested LR marked."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="LR range test")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def filters_png(weight, out: str | os.PathLike, max_filters: int = 64) -> Path:
    """First-layer filters ``[O, I, kh, kw]`` as a grid: RGB when ``I == 3``, else the channel mean in gray.

    Each filter is scaled to [0, 1] on its own, as in Zeiler & Fergus, so shape is visible whatever the norm.
    """
    w = np.asarray(weight.detach().float().cpu() if hasattr(weight, "detach") else weight, dtype=np.float32)
    if w.ndim != 4:
        from transferkit.errors import TransferkitError

        raise TransferkitError(f"expected a conv weight [out, in, kh, kw], got shape {list(w.shape)}")
    w = w[:max_filters]
    tiles = w.transpose(0, 2, 3, 1) if w.shape[1] == 3 else w.mean(axis=1)[..., None].repeat(3, axis=-1)
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    tiles = np.divide(tiles - low, span, out=np.full_like(tiles, 0.5), where=span > 0)
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    fig = new_figure(columns * 0.9 + 0.5, rows * 0.9 + 0.8)
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(tile, interpolation="nearest")
        ax.axis("off")
    fig.suptitle(f"{len(tiles)} of {weight.shape[0]} first-layer filters, {weight.shape[2]}x{weight.shape[3]}")
    return save_figure(fig, out)


def cam_overlay(view: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """A CAM ``heatmap`` in [0, 1] blended over ``view`` (uint8 HWC) as a uint8 RGB image (grad-cam's colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(view.astype(np.float32) / 255.0, heatmap, use_rgb=True)


def cam_overlay_png(view: np.ndarray, heatmap: np.ndarray, out: str | os.PathLike, title: str = "") -> Path:
    """The model's view of an image (uint8 HWC, after the eval resize) beside it with a CAM ``heatmap`` in [0, 1]."""
    overlay = cam_overlay(view, heatmap)
    fig = new_figure(8, 4.4)
    for ax, picture, label in zip(fig.subplots(1, 2), (view, overlay), ("model input", "class activation")):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def class_map_png(view: np.ndarray, class_map: np.ndarray, class_names: Sequence[str], fractions: Mapping[str, float],
                  out: str | os.PathLike, title: str = "") -> Path:
    """A frame (uint8 HWC) with its dense class map (``[h, w]`` class indices) laid over it in class colours,
    and a legend giving each class's share of the frame."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    colours = colormaps["tab20" if len(class_names) > 10 else "tab10"].resampled(max(len(class_names), 2))
    height, width = view.shape[:2]
    fig = new_figure(min(4 + 6 * width / height, 16), 6)
    ax = fig.add_subplot()
    ax.imshow(view)
    ax.imshow(class_map, cmap=colours, vmin=-0.5, vmax=colours.N - 0.5, alpha=0.45, interpolation="nearest",
              extent=(0, width, height, 0))
    ax.axis("off")
    shown = [i for i, name in enumerate(class_names) if fractions.get(name, 0) > 0][:20]
    ax.legend(handles=[Patch(color=colours(i), label=f"{class_names[i]} {fractions[class_names[i]]:.0%}") for i in shown],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out)


def augmentation_preview_png(index_or_path, aug, preprocessing, out: str | os.PathLike, n: int = 16,
                             seed: int = 0, versions: int = 4) -> Path:
    """``n`` augmented training samples, each original beside its augmented versions, to eyeball a pipeline.

    One row per original image: first the image as validation sees it (the eval transform, captioned with its
    class), then ``versions`` draws of the training transform of it (the last row may have fewer, ``n`` in
    all). ``preprocessing`` (:class:`transferkit.models.preprocessing.Preprocessing`) supplies the fit to the
    input and its inverse normalisation, so the tiles are exactly what the model sees.
    """
    from PIL import Image

    from transferkit.data.decode import load_image
    from transferkit.data.discover import DatasetIndex, discover
    from transferkit.errors import TransferkitError

    if n < 1:
        raise TransferkitError(f"-n must be at least 1, got {n}")
    index = index_or_path if isinstance(index_or_path, DatasetIndex) else discover(index_or_path, val_ratio=0.0)
    samples = index.split("train") or index.samples
    transform, plain = preprocessing.train_transform(aug), preprocessing.eval_transform()
    transform.set_random_seed(seed)
    originals = math.ceil(n / versions)
    picks = np.random.default_rng(seed).choice(len(samples), size=originals, replace=len(samples) < originals)
    rows = []
    for row, i in enumerate(picks):
        sample = samples[int(i)]
        image = load_image(sample.path, preprocessing.decode_short_side)
        tiles = [(Image.fromarray(preprocessing.denormalize(plain(image))), f"{index.classes[sample.label]}: original")]
        for k in range(min(versions, n - row * versions)):
            tiles.append((Image.fromarray(preprocessing.denormalize(transform(image))), f"augmented {k + 1}"))
        rows.append(tiles)
    canvas = _tile_grid(rows)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(out)


def _tile_grid(rows: list[list], min_tile: int = 160, caption: int = 18, gap: int = 4, divider: int = 8):
    """A canvas of ``(image, caption)`` tiles, one list per row; the first column (the originals) is set off."""
    from PIL import Image, ImageDraw, ImageFont

    columns = max(len(row) for row in rows)
    width, height = rows[0][0][0].size
    zoom = max(1, math.ceil(min_tile / max(width, height)))  # tiny inputs are enlarged so captions fit
    cell_w, cell_h = width * zoom, height * zoom + caption
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap + divider, len(rows) * (cell_h + gap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=caption - 4)
    for r, row in enumerate(rows):
        for c, (tile, label) in enumerate(row):
            x, y = gap + c * (cell_w + gap) + (divider if c else 0), gap + r * (cell_h + gap)
            canvas.paste(tile.resize((cell_w, height * zoom), Image.NEAREST), (x, y + caption))
            draw.text((x + 2, y + 1), label, fill=(0, 0, 0), font=font)
    draw.line([(gap + cell_w + (gap + divider) // 2, 0), (gap + cell_w + (gap + divider) // 2, canvas.height)],
              fill=(160, 160, 160), width=2)
    return canvas


def evaluation_subject(model: str | None, split: str, n: int | None = None) -> str:
    """What an evaluation's figures show: the model (its run or model folder's name, or its MLflow URI) and the
    split, e.g. ``tf_efficientnet_lite0-full-20261204-192851 · val (22 images)``."""
    name = str(model or "model")
    if "://" not in name and not name.startswith(("runs:/", "models:/")):
        path = Path(name)
        name = path.parent.name if path.suffix in (".safetensors", ".json") else path.name
    return f"{name} · {split}" + (f" ({n} images)" if n is not None else "")


def _titled(text: str, subject: str) -> str:
    return f"{subject}\n{text}" if subject else text


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def _number(value) -> float | None:
    """A plottable float, or None for blanks/NaN/non-numbers from a CSV row."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
