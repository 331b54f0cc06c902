"""Figures of the evaluate stage. Each function writes one PNG atomically (Agg backend).

Shared inputs:
- a "cell" is a dict with `mode` (str), `fraction` (float in (0, 1]) and, as needed,
  `seed` (int), `curve` ({column: sequence over epochs 1..E}) or `confusion` (C x C counts);
- `summary` is {mode: {key: {"fraction", "accuracy", "convergence_epoch", ... [, "<name>_std"]}}};
- `comparison` is {key: {"fraction", "difference", "ci_low", "ci_high", "p_primary_holm",
  "convergence": {"threshold", "baseline_epochs", "ssl_epochs", ...}, ...}, ...} (see study.compare).
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from stages.lib.io import atomic_path  # noqa: E402

MODE_COLOURS = {"baseline": "tab:blue", "ssl": "tab:orange", "linear": "tab:green"}
OTHER_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
LINE_STYLES = ("-", "--", ":", "-.")
# The primary test of a comparison entry (study.compare's `primary_test`), in words.
PRIMARY = {"images": "over test images", "seeds": "across seeds"}
DPI = 110


def mode_order(modes):
    """Modes in reading order: baseline, ssl, linear, then any others alphabetically."""
    known = [m for m in MODE_COLOURS if m in modes]
    return known + sorted(set(modes) - set(known))


def _colour(mode, modes):
    """The colour of `mode` among `modes` (in mode_order): its own, else the next of OTHER_COLOURS."""
    if mode in MODE_COLOURS:
        return MODE_COLOURS[mode]
    others = [m for m in modes if m not in MODE_COLOURS]
    return OTHER_COLOURS[others.index(mode) % len(OTHER_COLOURS)]


def percent(fraction):
    """1.0 -> '100%', 0.1 -> '10%', 0.025 -> '2.5%'."""
    return f"{fraction * 100:g}%"


def n_label(fraction):
    """A label fraction as figures and tables name it: 0.1 -> 'N = 10%'."""
    return f"N = {percent(fraction)}"


def points(value):
    """Percentage points in words: 1 -> '1 percentage point', 0.5 -> '0.5 percentage points'."""
    return f"{value:g} percentage point" + ("" if value == 1 else "s")


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


SAMPLE_COLUMNS = 8  # images per class in the sample grid
MAX_NAMED_CLASSES = 20  # a figure names at most this many classes; beyond that, names would overlap


def sample_grid(x, y, classes, path, *, seed):
    """A grid of training images: one row per class (name on the left), SAMPLE_COLUMNS columns; with more
    than MAX_NAMED_CLASSES classes, that many of them, drawn at random (a figure stays readable).

    x: uint8 (N, H, W, 3); y: int (N,); classes: names by label; seed picks the classes and images.
    """
    rng = np.random.default_rng(seed)
    many = len(classes) > MAX_NAMED_CLASSES
    labels = np.sort(rng.choice(len(classes), MAX_NAMED_CLASSES, replace=False)) if many else np.arange(len(classes))
    height, width = x.shape[1:3]
    pad = 2
    mosaic = np.full((len(labels) * (height + pad) + pad, SAMPLE_COLUMNS * (width + pad) + pad, 3), 255, np.uint8)
    shown = 0
    for row, label in enumerate(labels):
        members = np.flatnonzero(y == label)
        chosen = rng.choice(members, size=min(SAMPLE_COLUMNS, len(members)), replace=False) if len(members) else []
        shown = max(shown, len(chosen))
        for col, index in enumerate(chosen):
            top, left = pad + row * (height + pad), pad + col * (width + pad)
            mosaic[top : top + height, left : left + width] = x[index]
    fig, ax = plt.subplots(figsize=(1.0 * SAMPLE_COLUMNS + 1.6, 1.0 * len(labels) + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + r * (height + pad) + height / 2 for r in range(len(labels))])
    ax.set_yticklabels([classes[label] for label in labels], fontsize=11)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    some = f" ({len(labels)} of {len(classes)} classes)" if many else ""
    ax.set_title(f"Training images, up to {shown} random per class{some}", fontsize=12)
    _save(fig, path)


def _modes_and_fractions(cells):
    """(modes of `cells` in mode_order, their fractions largest first)."""
    return mode_order({c["mode"] for c in cells}), sorted({c["fraction"] for c in cells}, reverse=True)


def curves(cells, column, ylabel, path):
    """One line per cell of `column` over epochs (colour = mode, line style = fraction)."""
    modes, fractions = _modes_and_fractions(cells)
    styles = {f: LINE_STYLES[i % len(LINE_STYLES)] for i, f in enumerate(fractions)}
    several_seeds = len({c["seed"] for c in cells}) > 1
    fig, ax = plt.subplots(figsize=(8, 5))
    ordered = sorted(cells, key=lambda c: (modes.index(c["mode"]), -c["fraction"], c["seed"]))
    for cell in ordered:
        values = np.asarray(cell["curve"][column], dtype=float)
        label = f"{cell['mode']}, {n_label(cell['fraction'])}"
        if several_seeds:
            label += f", seed {cell['seed']}"
        ax.plot(np.arange(1, len(values) + 1), values, color=_colour(cell["mode"], modes),
                linestyle=styles[cell["fraction"]], marker=".", label=label)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(cells) > 6 else 1)
    _save(fig, path)


def grouped(summary):
    """(modes in order, sorted keys by descending fraction, {key: fraction})."""
    fractions = {k: entry["fraction"] for cells in summary.values() for k, entry in cells.items()}
    keys = sorted(fractions, key=lambda k: -fractions[k])
    return mode_order(list(summary)), keys, fractions


def compared(comparison):
    """[(key, entry)] of the fractions N that `comparison` compares (entries with a `difference`),
    largest fraction first."""
    entries = [(k, e) for k, e in comparison.items() if isinstance(e, dict) and "difference" in e]
    return sorted(entries, key=lambda item: -item[1]["fraction"])


def _grouped_bars(ax, groups, labels, modes):
    """Bars in groups: groups is {mode: [(x index, height, error)]}; labels the x tick labels."""
    width = 0.8 / max(1, len(groups))
    for i, (mode, bars) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j, _, _ in bars]
        heights, errors = [h for _, h, _ in bars], [e for _, _, e in bars]
        drawn = ax.bar(xs, heights, width, yerr=errors if any(errors) else None, capsize=3,
                       color=_colour(mode, modes), label=mode)
        ax.bar_label(drawn, labels=[f"{h:g}" for h in heights], fontsize=8, padding=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.grid(axis="y", alpha=0.3)
    top = max((h + e for bars in groups.values() for _, h, e in bars), default=1.0)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.25 * top))  # room above the bars for the legend
    ax.legend(loc="upper left", ncol=len(groups))


def convergence_bars(summary, comparison, tolerance, path):
    """Epochs to convergence by both definitions, in two panels; tolerance in points.

    Left: per cell, within `tolerance` of the cell's own best (summary; std over seeds as
    error bar). Right: per N, epochs baseline and SSL need to reach the common threshold
    (comparison's `convergence`: lower of the two bests minus tolerance, mean over seeds).
    """
    modes, keys, fractions = grouped(summary)
    rows = [entry for _, entry in compared(comparison)]
    fig, (own, common) = plt.subplots(1, 2, sharey=True, figsize=(max(10, 3.2 * len(keys) + 3), 4.5))
    _grouped_bars(own, {m: [(j, summary[m][k]["convergence_epoch"], summary[m][k].get("convergence_epoch_std", 0))
                            for j, k in enumerate(keys) if k in summary[m]] for m in modes},
                  [n_label(fractions[k]) for k in keys], modes)
    own.set_ylabel("Epochs")
    own.set_title(f"Own best: within {points(tolerance)} of the cell's best", fontsize=10)
    common.set_title(f"Common threshold: lower of the two bests - {points(tolerance)}", fontsize=10)
    if rows:
        _grouped_bars(common, {m: [(j, e["convergence"][f"{m}_epochs"], 0) for j, e in enumerate(rows)]
                               for m in ("baseline", "ssl")},
                      [f"{n_label(e['fraction'])}\n(at {100 * e['convergence']['threshold']:.1f}%)" for e in rows],
                      modes)
    else:
        common.text(0.5, 0.5, "No SSL / baseline pair to compare", ha="center", va="center",
                    transform=common.transAxes, fontsize=11)
        common.set_xticks([])
    common.tick_params(labelleft=True)
    fig.suptitle("Epochs until validation accuracy converges (fewer = faster)", fontsize=12)
    _save(fig, path)


def gain_with_ci(comparison, path):
    """SSL minus baseline test accuracy per N, in points, with the bootstrap interval and the
    Holm-corrected p-value of the primary test."""
    rows = [entry for _, entry in compared(comparison)]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows) + 2), 4.5))
    if not rows:
        ax.text(0.5, 0.5, "No SSL / baseline pair to compare", ha="center", va="center", fontsize=13)
        ax.set_axis_off()
        _save(fig, path)
        return
    gains = np.array([100 * e["difference"] for e in rows])
    low = gains - np.array([100 * e["ci_low"] for e in rows])
    high = np.array([100 * e["ci_high"] for e in rows]) - gains
    colours = ["tab:green" if g >= 0 else "tab:red" for g in gains]
    ax.bar(range(len(rows)), gains, 0.6, yerr=[low, high], capsize=6, color=colours, alpha=0.8)
    for i, (gain, entry) in enumerate(zip(gains, rows)):
        tip = gain + high[i] if gain >= 0 else gain - low[i]
        text = f"{gain:+.1f} points\n{PRIMARY[entry['primary_test']]}, Holm p = {entry['p_primary_holm']:.2g}"
        ax.annotate(text, (i, tip), ha="center", fontsize=8,
                    xytext=(0, 4 if gain >= 0 else -4), textcoords="offset points", va="bottom" if gain >= 0 else "top")
    ax.margins(y=0.2)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([n_label(e["fraction"]) for e in rows])
    ax.set_ylabel("SSL - baseline test accuracy [points]")
    confidence = rows[0].get("confidence")
    level = f"{confidence * 100:g}% " if confidence else ""
    ax.set_title(f"SSL gain over the baseline, with {level}bootstrap confidence interval")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def accuracy_vs_fraction(summary, path):
    """Test accuracy (%) against label fraction on a log axis, one line per mode."""
    modes, keys, fractions = grouped(summary)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        ks = sorted(summary[mode], key=lambda k: fractions[k])
        xs = [fractions[k] for k in ks]
        ys = [100 * summary[mode][k]["accuracy"] for k in ks]
        errors = [100 * summary[mode][k].get("accuracy_std", 0) for k in ks]
        ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=4,
                    color=_colour(mode, modes), label=mode)
    ax.set_xscale("log")
    ticks = sorted(set(fractions.values()))
    ax.set_xticks(ticks)
    ax.set_xticklabels([percent(f) for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("Labeled fraction N of the training set (log scale)")
    ax.set_ylabel("Test accuracy [%]")
    ax.set_title("Test accuracy vs label fraction")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def confusion_matrices(cells, classes, path):
    """Row-normalised confusion matrices in a grid: a row of panels per mode, a column per N."""
    modes, fractions = _modes_and_fractions(cells)
    fig, axes = plt.subplots(len(modes), len(fractions), squeeze=False, layout="constrained",
                             figsize=(3.6 * len(fractions) + 1.2, 3.8 * len(modes) + 0.6))
    image = None
    named = len(classes) <= MAX_NAMED_CLASSES  # beyond that, the matrix alone
    for ax in axes.flat:
        ax.set_axis_off()
    for cell in cells:
        row, col = modes.index(cell["mode"]), fractions.index(cell["fraction"])
        ax = axes[row, col]
        counts = np.asarray(cell["confusion"], dtype=float)
        rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        ax.set_axis_on()
        ax.set_xticks(range(len(classes)) if named else [])
        ax.set_xticklabels(classes if named else [], rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)) if named else [])
        ax.set_yticklabels(classes if named and col == 0 else [], fontsize=7)
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{cell['mode']}, {n_label(cell['fraction'])} (acc {100 * accuracy:.1f}%)", fontsize=9)
        if row == len(modes) - 1:
            ax.set_xlabel("predicted class", fontsize=8)
        if col == 0:
            ax.set_ylabel("true class", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of the true class")
    fig.suptitle("Test-set confusion matrices (rows normalised)", fontsize=12)
    _save(fig, path)
