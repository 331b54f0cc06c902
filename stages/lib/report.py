"""The study's markdown report (metrics/report.md), built only from the evaluate stage's inputs.

Inputs (see stages/evaluate.py): `summary` {mode: {key: entry}}, `comparison`
{key: entry, "label_efficiency": {...}}, the data's `facts`, the `devices` per mode, the
`settings` (params' EvaluateParams), optional SimCLR `pretrain` metrics and figure links.
Accuracies are fractions in the inputs and percentages in the text.
"""
import re

from stages.lib.metrics import MCNEMAR_EXACT_BELOW
from stages.lib.plots import compared, grouped, mode_order, percent, points
from stages.lib.study import MIN_SEEDS_FOR_SEEDS_TEST

# Reference numbers reported by the seed project this study grew from (test accuracy on the whole of
# CIFAR-10, all other numbers of it are unknown); shown beside ours only when the data is the whole of
# CIFAR-10 with its own test set too (`compares_with_seed_project`), never used in any computation.
SEED_PROJECT = {1.0: {"baseline": 0.714, "ssl": 0.396}, 0.1: {"baseline": 0.507, "ssl": 0.343}}
# DataFacts.test_split of a test set that came with the data (sources.py): a download's official one, or a
# local copy's test/ folder; any other ("held out 20% of ...") was cut from the training images.
OWN_TEST_SETS = ("official", "test/ folder")
NOT_REPORTED = "not reported"
NOT_RUN = "not run"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(entry, name):
    """'85.3%' or, with several seeds, '85.3 ± 0.4%'."""
    if entry is None or entry.get(name) is None:
        return NOT_RUN
    if f"{name}_std" in entry:
        return f"{100 * entry[name]:.1f} ± {100 * entry[f'{name}_std']:.1f}%"
    return f"{100 * entry[name]:.1f}%"


def _num(entry, name, digits=0):
    if entry is None or entry.get(name) is None:
        return NOT_RUN
    value = f"{entry[name]:.{digits}f}"
    return f"{value} ± {entry[f'{name}_std']:.{digits}f}" if f"{name}_std" in entry else value


def _epochs(entry, name):
    """An epoch count: whole for one seed, one decimal for a mean over seeds."""
    return _num(entry, name, 1 if entry and f"{name}_std" in entry else 0)


def _entries(summary):
    """(mode, entry) of every summary entry: modes in reading order, then the largest fraction first."""
    for mode in mode_order(list(summary)):
        for key in sorted(summary[mode], key=lambda k: -summary[mode][k]["fraction"]):
            yield mode, summary[mode][key]


def experiments_section(summary):
    rows = []
    for mode, e in _entries(summary):
        rows.append([mode, percent(e["fraction"]), _num(e, "labeled_images"), _pct(e, "accuracy"),
                     _pct(e, "precision"), _pct(e, "recall"), _pct(e, "f1"), _epochs(e, "convergence_epoch"),
                     _num(e, "seconds", 1)])
    header = ["Mode", "N", "Labeled images", "Accuracy", "Precision (macro)", "Recall (macro)", "F1 (macro)",
              "Convergence epoch", "Seconds"]
    return "## Metrics comparison per experiment\n\n" + _table(header, rows)


SETTING_COLUMNS = (("lr", "Head lr"), ("backbone_lr", "Backbone lr"), ("head_epochs", "Head-only epochs"),
                   ("epochs", "Epochs"), ("weight_decay", "Weight decay"), ("batch_size", "Batch"),
                   ("equal_steps", "Equal steps"))


def settings_section(summary):
    """The fine-tuning settings each cell ran with, and its best epoch."""
    rows = []
    for mode, e in _entries(summary):
        values = [f"{e['settings'][name]}" for name, _ in SETTING_COLUMNS]
        rows.append([mode, percent(e["fraction"]), *values, _epochs(e, "best_epoch")])
    header = ["Mode", "N"] + [title for _, title in SETTING_COLUMNS] + ["Best epoch (kept)"]
    text = ("The settings each cell was fine-tuned with (`finetune` in params.yaml; baseline and ssl by the "
            "same rule, linear with its backbone frozen throughout) and the epoch whose weights were kept: the "
            "best validation accuracy over the whole schedule.\n\n")
    return "## Fine-tuning settings per cell\n\n" + text + _table(header, rows)


def performance_section(summary):
    modes, keys, fractions = grouped(summary)
    rows = [[percent(fractions[k])] + [_pct(summary[m].get(k), "accuracy") for m in modes] for k in keys]
    return "## Performance summary\n\nTest accuracy per label fraction N.\n\n" + _table(
        ["N"] + [f"{m} accuracy" for m in modes], rows)


def _verdict(pairs):
    groups = {"SSL is significantly better": [], "the baseline is significantly better": [],
              "the difference is not significant": []}
    for _, e in pairs:
        if not e["significant"]:
            groups["the difference is not significant"].append(percent(e["fraction"]))
        elif e["difference"] > 0:
            groups["SSL is significantly better"].append(percent(e["fraction"]))
        else:
            groups["the baseline is significantly better"].append(percent(e["fraction"]))
    parts = [f"{text} at N = {', '.join(ns)}" for text, ns in groups.items() if ns]
    return "In short: " + "; ".join(parts) + "."


def _p_cell(entry, name, primary):
    """'0.0123 (Holm 0.0369)' for p-value `name` of an entry, in bold when it is the primary test."""
    if entry[f"p_{name}"] is None:
        return "—"
    text = f"{entry[f'p_{name}']:.3g} (Holm {entry[f'p_{name}_holm']:.3g})"
    return f"**{text}**" if name == primary else text


def improvement_section(comparison, settings):
    pairs = compared(comparison)
    title = "## Improvement analysis\n\n"
    if not pairs:
        return title + comparison.get("note", "No SSL / baseline pair to compare.")
    level = f"{settings.confidence * 100:g}%"
    alpha = f"{1 - settings.confidence:.2g}"
    rows = []
    for _, e in pairs:
        relative = NOT_RUN if e["relative"] is None else f"{100 * e['relative']:+.1f}%"
        per_seed = ", ".join(f"{seed}: {p:.3g}" for seed, p in e["mcnemar_p_per_seed"].items())
        rows.append([percent(e["fraction"]), e["seeds"], f"{100 * e['baseline_accuracy']:.1f}%",
                     f"{100 * e['ssl_accuracy']:.1f}%", f"{100 * e['difference']:+.1f}", relative,
                     f"[{100 * e['ci_low']:+.1f}, {100 * e['ci_high']:+.1f}]", per_seed,
                     _p_cell(e, "images", e["primary_test"]), _p_cell(e, "seeds", e["primary_test"]),
                     "yes" if e["significant"] else "no"])
    header = ["N", "Seeds", "Baseline", "SSL", "SSL − baseline [points]", "Relative", f"{level} CI [points]",
              "McNemar p per seed", "p over test images", "p across seeds", f"Significant (Holm p < {alpha})"]
    exact, seeds = MCNEMAR_EXACT_BELOW, MIN_SEEDS_FOR_SEEDS_TEST
    text = (f"SSL minus baseline test accuracy on the same test images, mean over the seeds both modes ran. "
            f"The interval is a paired percentile bootstrap over test images ({settings.bootstrap_samples:,} "
            f"resamples) that carries every seed's predictions for each resampled image: it is the interval of "
            f"the mean over seeds of d_i, SSL correct minus baseline correct on image i (not adjusted for "
            f"multiple comparisons). McNemar's test (exact binomial below {exact} discordant pairs) is run per "
            f"seed, never on pooled seeds. *p over test images*: with one seed, that seed's McNemar p; with "
            f"several, a two-sided one-sample t-test of d_i (mean over seeds per image) against 0 over the test "
            f"images. *p across seeds* ({seeds} or more seeds): a paired t-test of the per-seed test accuracies, "
            f"pairs matched by seed. Each p-value is shown with its Holm correction across the label fractions N "
            f"compared ({len(pairs)}; each test its own family). *Significant* uses the Holm-corrected p of the "
            f"primary test (in bold): the test across seeds with {seeds} or more seeds, else the test over test "
            f"images.\n\n")
    return title + text + _table(header, rows) + "\n\n" + _verdict(pairs)


def convergence_section(summary, comparison, settings):
    modes, keys, fractions = grouped(summary)
    tolerance = points(settings.convergence_tolerance)
    rows = []
    for k in keys:
        row = [percent(fractions[k])]
        for m in modes:
            row.append(_epochs(summary[m].get(k), "convergence_epoch"))
        rows.append(row)
    text = (f"Own best: the first epoch whose validation accuracy is within {tolerance} "
            f"of the cell's own best. Each cell is measured against itself, so under a decaying learning rate "
            f"both modes tend to converge near the end and this says little about which learns faster.\n\n")
    section = "## Convergence\n\n" + text + _table(["N"] + [f"{m} epochs (own best)" for m in modes], rows)
    pairs = compared(comparison)
    if not pairs:
        return section
    common = []
    for _, e in pairs:
        c = e["convergence"]
        common.append([percent(e["fraction"]), f"{100 * c['threshold']:.1f}%", f"{c['baseline_epochs']:g}",
                       f"{c['ssl_epochs']:g}", f"{c['baseline_epochs_own_best']:g}", f"{c['ssl_epochs_own_best']:g}"])
    header = ["N", "Common threshold", "baseline epochs", "ssl epochs", "baseline epochs (own best)",
              "ssl epochs (own best)"]
    text = (f"Common threshold, which compares the modes: for each seed both modes ran, the lower of the two "
            f"modes' best validation accuracies minus {tolerance}; the epochs each mode needs to reach "
            f"it are found per seed, then averaged over the seeds (the threshold shown is its mean over seeds). "
            f"Both modes always reach it; fewer epochs means faster learning. The own-best epochs beside it "
            f"are over the same seeds.\n\n")
    return section + "\n\n" + text + _table(header, common)


def _ours(summary, mode, fraction, name):
    for e in summary.get(mode, {}).values():
        if abs(e["fraction"] - fraction) < 1e-9:
            return e.get(name)
    return None


def _gain(values):
    if any(v is None for v in values.values()) or set(values) != {"ssl", "baseline"}:
        return NOT_RUN
    return f"{100 * (values['ssl'] - values['baseline']):+.1f}"


def is_cifar10(name):
    """Whether a data set's name (DataFacts.name) is CIFAR-10's: cifar10, or a copy named cifar10-... or
    cifar10_... (cifar10-jpeg); not cifar100."""
    return re.fullmatch(r"cifar10([-_].*)?", name) is not None


def compares_with_seed_project(facts):
    """Whether the seed project's numbers fit the data (DataFacts): CIFAR-10 without a data.limit subset,
    tested on a test set that came with it, not on one held out of its training images."""
    return is_cifar10(facts.name) and facts.limit is None and facts.test_split in OWN_TEST_SETS


def seed_project_section(summary):
    rows = []
    for fraction, theirs in SEED_PROJECT.items():
        ours = {m: _ours(summary, m, fraction, "accuracy") for m in ("baseline", "ssl")}
        for mode in ("baseline", "ssl"):
            f1 = _ours(summary, mode, fraction, "f1")
            rows.append([percent(fraction), mode, f"{100 * theirs[mode]:.1f}%",
                         NOT_RUN if ours[mode] is None else f"{100 * ours[mode]:.1f}%",
                         NOT_REPORTED, NOT_RUN if f1 is None else f"{100 * f1:.1f}%"])
        rows.append([percent(fraction), "SSL − baseline [points]",
                     f"{100 * (theirs['ssl'] - theirs['baseline']):+.1f}", _gain(ours), NOT_REPORTED, ""])
    header = ["N", "Mode", "Seed project accuracy", "Our accuracy", "Seed project F1 (macro)", "Our F1 (macro)"]
    text = ("Test accuracy reported by the seed project this study grew from, beside ours. It reported only "
            "these four accuracies; its N = 50% results, F1 scores and convergence are not reported.\n\n")
    return "## Seed project vs this study\n\n" + text + _table(header, rows)


def label_efficiency_section(comparison):
    efficiency = comparison.get("label_efficiency")
    if not efficiency:
        return ""
    return "## Label efficiency\n\n" + efficiency["note"]


def pretrain_section(pretrain):
    if not pretrain:
        return ""
    fields = [("Final NT-Xent loss", "loss", lambda v: f"{v:.4f}"),
              ("kNN accuracy (validation split)", "knn_accuracy", lambda v: f"{100 * v:.1f}%"),
              ("Epochs", "epochs", lambda v: f"{v:g}"), ("Seconds", "seconds", lambda v: f"{v:.0f}"),
              ("Images per second", "images_per_second", lambda v: f"{v:,.0f}"), ("Device", "device", str)]
    rows = [[label, NOT_REPORTED if pretrain.get(key) is None else fmt(pretrain[key])] for label, key, fmt in fields]
    return "## SimCLR pretraining\n\n" + _table(["Quantity", "Value"], rows)


def data_section(facts, devices):
    unrecorded = "a torchvision download, checked by its own checksum" if facts.url else "a folder, not an archive file"
    lines = [f"- Data: `{facts.name}` from `{facts.url or facts.source}`",
             f"- SHA-256 of the source: `{facts.sha256}`" if facts.sha256
             else f"- SHA-256 of the source: none recorded ({unrecorded})",
             f"- Images: {facts.image_size}x{facts.image_size} RGB, {len(facts.classes)} classes; test set: "
             f"{facts.test_split}"]
    if facts.limit is not None:
        unlabeled = ", and as many unlabeled ones" if facts.unlabeled else ""
        lines.append(f"- Subset: `data.limit` = {facts.limit} (at most that many labeled training images, "
                     f"stratified by class{unlabeled}; the test set is whole)")
    for split, count in facts.images.items():
        lines.append(f"- {split} images: {count}")
    if facts.unlabeled:
        lines.append(f"- unlabeled images (pretraining only): {facts.unlabeled}")
    if facts.name.startswith("cifar10-jpeg"):
        lines.append("- The images are a JPEG (quality 75) re-encoding of CIFAR-10, not the original PNG-exact "
                     "pixels, so accuracies run a little below those on canonical CIFAR-10.")
    for mode in mode_order(list(devices)):
        lines.append(f"- Fine-tuning device ({mode}): {', '.join(devices[mode])}")
    return "## Data and device\n\n" + "\n".join(lines)


def figures_section(figures):
    if not figures:
        return ""
    return "## Figures\n\n" + "\n\n".join(f"![{title}]({link})" for title, link in figures)


def build(summary, comparison, facts, devices, settings, pretrain=None, figures=()):
    """Return the report's markdown text. `facts`: the data's prepared.DataFacts; `settings`: params'
    EvaluateParams; figures: [(title, link relative to the report)]."""
    seeds = max((e["seeds"] for cells in summary.values() for e in cells.values()), default=1)
    intro = (f"SimCLR-pretrained (`ssl`) vs randomly initialised (`baseline`) ResNet fine-tuning on `{facts.name}` "
             "at several label fractions N. All numbers are test-set results of the best-validation weights, "
             "computed by the evaluate stage from the fine-tune outputs.")
    if seeds > 1:
        intro += " Where several seeds ran, values are mean ± standard deviation over seeds."
    sections = [
        f"# SimCLR vs supervised baseline on {facts.name}", intro,
        experiments_section(summary), settings_section(summary), performance_section(summary),
        improvement_section(comparison, settings), convergence_section(summary, comparison, settings),
        seed_project_section(summary) if compares_with_seed_project(facts) else "",
        label_efficiency_section(comparison), pretrain_section(pretrain), data_section(facts, devices),
        figures_section(figures),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
