"""Draw the gist attention mask as a labelled picture (matplotlib, Agg; no pyplot, no display).

Rows are queries (the token attending), columns are keys (the token attended to); both axes are cut
into the layout's segments: context (or chunk i), gists (gists i), question, answer, padding. A cell
is one of four categories, each with its own colour:

- attend:              the query may attend to the key (`GistBatch.attend` is True);
- blocked (gist rule): the key is earlier, yet hidden, e.g. question -> context;
- future (causal):     the key is later than the query;
- padding:             the query or the key is padding (seen by nothing, sees nothing).

One layout draws one panel at its own length. A batch (a list of layouts) draws one panel per example,
all at the batch's padded length, so the left padding a collated batch carries is visible. The mask is
drawn as one image (imshow), so 3000 tokens render in about 1.5 s.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gistctl.gist.mask import PAD, GistLayout, build_gist_mask
from gistctl.runs import atomic_path

ATTEND, BLOCKED, FUTURE, PADDING = 0, 1, 2, 3
CELL_NAMES = {ATTEND: "attend", BLOCKED: "blocked (gist rule)", FUTURE: "future (causal)", PADDING: "padding"}
CELL_COLOURS = {ATTEND: "#1f5fa8", BLOCKED: "#f08c3a", FUTURE: "#e3e3e3", PADDING: "#f6efd9"}
MAX_PANELS = 6
PANEL_INCHES = (7.0, 7.0)  # one panel, labels included
LEGEND_INCHES = 0.9  # title and legend
FORMATS = ("png", "svg", "pdf")


def segments(layout: GistLayout, padding: int = 0) -> list[tuple[str, int]]:
    """(name, length) of every non-empty segment in token order, left padding first."""
    single = len(layout.chunks) == 1
    parts = [("padding", padding)]
    for i, chunk in enumerate(layout.chunks, start=1):
        parts.append(("context" if single else f"chunk {i}", chunk))
        parts.append(("gists" if single else f"gists {i}", layout.num_gist))
    parts += [("question", layout.question), ("answer", layout.answer)]
    return [(name, n) for name, n in parts if n > 0]


def describe(layout: GistLayout) -> str:
    """One line: K and the segment lengths, e.g. 'K=25, context 40, question 8, answer 4 (77 tokens)'."""
    context = (f"context {layout.chunks[0]}" if len(layout.chunks) == 1
               else f"{len(layout.chunks)} chunks {'+'.join(map(str, layout.chunks))}")
    return (f"K={layout.num_gist}, {context}, question {layout.question}, answer {layout.answer} "
            f"({layout.length} tokens)")


def cell_categories(layouts: list[GistLayout]) -> np.ndarray:
    """(B, L, L) uint8 cell category (ATTEND, BLOCKED, FUTURE, PADDING) of a left-padded batch."""
    batch = build_gist_mask(layouts)
    length = batch.kinds.shape[1]
    pad = (batch.kinds == PAD).numpy()
    future = np.triu(np.ones((length, length), dtype=bool), k=1)
    cells = np.full(batch.attend.shape, BLOCKED, dtype=np.uint8)
    cells[:, future] = FUTURE
    cells[batch.attend.numpy()] = ATTEND
    cells[pad[:, :, None] | pad[:, None, :]] = PADDING
    return cells


def figure_pixels(panels: int, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with `panels` panels at `dpi`."""
    width, height = _figure_inches(panels)
    return round(width * dpi), round(height * dpi)


def draw_mask(layouts: GistLayout | list[GistLayout], path: str | Path, title: str | None = None,
              labels: list[str] | None = None, dpi: int = 150) -> Path:
    """Draw the mask of one layout (or one panel per layout of a batch) to `path`, atomically.

    The format follows the suffix (.png, .svg, .pdf); a PNG is `figure_pixels(panels, dpi)` in size.
    `title` replaces the default (K and lengths); `labels` names each panel (e.g. the example's id).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layouts = [layouts] if isinstance(layouts, GistLayout) else list(layouts)
    if not 1 <= len(layouts) <= MAX_PANELS:
        raise ValueError(f"draw 1 to {MAX_PANELS} layouts at once, got {len(layouts)}")
    if labels is not None and len(labels) != len(layouts):
        raise ValueError(f"{len(labels)} labels for {len(layouts)} layouts")
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in FORMATS:
        raise ValueError(f"cannot write '{path.name}': use a .png, .svg or .pdf name")

    cells = cell_categories(layouts)
    length = cells.shape[-1]
    cmap = ListedColormap([CELL_COLOURS[c] for c in sorted(CELL_COLOURS)])
    fig = Figure(figsize=_figure_inches(len(layouts)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    columns = min(len(layouts), 3)
    rows = math.ceil(len(layouts) / columns)
    for index, layout in enumerate(layouts):
        ax = fig.add_subplot(rows, columns, index + 1)
        # Categories as integers through a listed colormap: one image, fast at any size. Down-sampled
        # views blend neighbouring colours (antialiased) instead of dropping thin rows. aspect="auto":
        # constrained layout places a fixed-aspect Axes' top labels onto the figure title.
        ax.imshow(cells[index], cmap=cmap, vmin=-0.5, vmax=len(CELL_COLOURS) - 0.5, interpolation="antialiased",
                  aspect="auto", extent=(0, length, length, 0))
        panel_title = describe(layout) if len(layouts) > 1 or labels else None
        if labels:
            panel_title = f"{labels[index]}\n{panel_title}"
        _label_segments(ax, segments(layout, padding=length - layout.length), length)
        if panel_title:
            ax.set_title(panel_title, fontsize=9)
    if title is None:
        if len(layouts) == 1:
            k, lengths = describe(layouts[0]).split(", ", 1)
            title = f"Gist attention mask, {k}\n{lengths}"
        else:
            ks = sorted({layout.num_gist for layout in layouts})
            title = (f"Gist attention mask, K={'/'.join(map(str, ks))}\n"
                     f"batch of {len(layouts)}, left-padded to {length} tokens")
    fig.suptitle(title, fontsize=11)
    handles = [Patch(facecolor=CELL_COLOURS[c], edgecolor="#555555", label=CELL_NAMES[c]) for c in sorted(CELL_NAMES)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return path


def _figure_inches(panels: int) -> tuple[float, float]:
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    return PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + LEGEND_INCHES


def _label_segments(ax, parts: list[tuple[str, int]], length: int) -> None:
    """Segment names at their centres on both axes (keys on top, queries on the left) and boundary lines."""
    starts = np.cumsum([0] + [n for _, n in parts])
    centres = [(a + b) / 2 for a, b in zip(starts[:-1], starts[1:])]
    names = [f"{name} ({n})" for name, n in parts]
    # Tiny segments (a 4-token answer after 1000 context tokens) would print their names on top of each
    # other; spread the labels to a minimum gap, keeping their order.
    positions = _spread(centres, gap=0.035 * length, low=0, high=length)
    ax.set_xticks(positions, names, rotation=90, fontsize=8)
    ax.set_yticks(positions, names, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xlabel("key (attended to)", fontsize=9)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("query (attending)", fontsize=9)
    for boundary in starts[1:-1]:
        ax.axhline(boundary, color="#333333", linewidth=0.6)
        ax.axvline(boundary, color="#333333", linewidth=0.6)
    ax.set_xlim(0, length)
    ax.set_ylim(length, 0)


def _spread(centres: list[float], gap: float, low: float, high: float) -> list[float]:
    """Move sorted positions apart to at least `gap`, staying within [low, high] where room allows."""
    out = list(centres)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    overflow = out[-1] - high
    if overflow > 0:
        out[-1] = high
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
        out = [max(p, low) for p in out] if out[0] < low else out
    return out
