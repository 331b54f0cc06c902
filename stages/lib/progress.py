"""A small progress bar on stderr: counts, rate, ETA and extra fields such as loss.

On a terminal it redraws one line; elsewhere (logs, CI, DVC) it prints a line at most
every `every_s` seconds and at the end, so logs stay short.
"""
import sys
import time


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    def __init__(self, label, total, unit="it", stream=None, every_s=None, quiet=False):
        self.label, self.total, self.unit, self.quiet = label, total, unit, quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
        self.start = time.perf_counter()
        self.last_draw = self.start
        self.done = 0

    def update(self, done, **fields):
        """Set progress to `done` items; fields (e.g. loss=1.23) are shown after the bar."""
        self.done = done
        if self.quiet:
            return
        now = time.perf_counter()
        if now - self.last_draw >= self.every_s or done >= self.total:
            self.last_draw = now
            self._draw(now, fields, final=done >= self.total)

    def _draw(self, now, fields, final):
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(20 * self.done / max(self.total, 1))
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
            f"{rate:,.0f} {self.unit}/s {format_seconds(elapsed)}<{format_seconds(eta)} {extra}".rstrip()
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
