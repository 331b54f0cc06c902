"""Progress on stderr: a tqdm bar on a terminal, and one summary line per finished bar.

On a terminal the bar redraws in place (at most every half second) and is erased when done;
the summary line that replaces it is what logs, CI and DVC's output keep, so they stay short:
`pretrain epoch 3/160: loss 5.012, ETA 3:24, 49,664 img in 0:01 (38,203 img/s)`
(97 steps of 512 images in 1.3 s; 157 epochs left at 1.3 s each).
"""
import sys
import time

from tqdm import tqdm

from stages.lib.cli import log


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _field(name, value):
    return f"{name} {value:#.4g}" if isinstance(value, float) else f"{name} {value}"  # 5.000, not 5


class Progress:
    """Counts `total` items (`unit`), starting at `initial` (a resumed epoch); quiet: no output at all."""

    def __init__(self, label, total, unit="it", initial=0, quiet=False):
        self.label, self.total, self.unit, self.quiet = label, total, unit, quiet
        self.start, self.initial, self.done = time.perf_counter(), initial, initial
        self.bar = tqdm(total=total, initial=initial, desc=label, unit=unit, unit_scale=True, leave=False,
                        mininterval=0.5, dynamic_ncols=True, file=sys.stderr,
                        disable=quiet or not sys.stderr.isatty())

    @property
    def visible(self):
        """True when the bar is drawn (on a terminal, not quiet): only then do updates before the last show."""
        return not self.bar.disable

    def update(self, done, **fields):
        """Set progress to `done` items; fields (e.g. loss=1.23) are shown beside the bar and in the summary."""
        self.bar.set_postfix_str(", ".join(_field(k, v) for k, v in fields.items()), refresh=False)
        self.bar.update(done - self.done)
        self.done = done
        if done >= self.total:
            self.bar.close()
            if not self.quiet:
                log(self.summary(fields))

    def summary(self, fields):
        """The bar's log line; the rate only when this process counted items (not a resume at the total)."""
        seconds = time.perf_counter() - self.start
        counted = f"{self.done:,} {self.unit} in {format_seconds(seconds)}"
        if self.done > self.initial:
            rate = (self.done - self.initial) / seconds if seconds > 0 else 0.0
            counted += f" ({rate:,.0f} {self.unit}/s)"
        parts = [_field(k, v) for k, v in fields.items()] + [counted]
        return f"{self.label}: {', '.join(parts)}"
