"""Metric sinks of a run: RUN/metrics.jsonl, TensorBoard (RUN/tb), and the loss curve RUN/loss.png."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from jaxllm import storage


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops records past the resumed step (they are
    recomputed) so the file and TensorBoard hold one value per step."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True, filename: str = "metrics.jsonl", step_key: str = "step"):
        self.enabled, self.step_key = enabled, step_key
        self.path = storage.path(run_dir) / filename
        self.tb_dir = storage.path(run_dir) / "tb"
        self._writer, self._tb_local, self._closed = None, None, False
        # In a bucket objects cannot be appended to: the log is kept here and each write replaces the
        # object; tensorboardX writes into a local folder whose event files are uploaded on every write.
        self._remote, self._lines = storage.is_remote(run_dir), []
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._file = None if self._remote else open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            if self._remote:
                import tempfile
                self._tb_local = Path(tempfile.mkdtemp(prefix="jaxllm-tb-"))
            self._writer = SummaryWriter(str(self._tb_local or self.tb_dir),
                                         purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        if not storage.exists(self.path):
            return
        kept = [line for line in storage.read_text(self.path).splitlines()
                if line.strip() and _step_of(line, self.step_key) <= step]
        self._lines = kept
        storage.write_atomic(self.path, "".join(line + "\n" for line in kept))

    def _sync_tensorboard(self) -> None:
        self._writer.flush()
        for event_file in sorted(self._tb_local.iterdir()):
            storage.write_atomic(self.tb_dir / event_file.name, event_file.read_bytes())

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {self.step_key: step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        if self._remote:
            self._lines.append(json.dumps(record))
            storage.write_atomic(self.path, "".join(line + "\n" for line in self._lines))
        else:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            if self._tb_local is not None:
                self._sync_tensorboard()

    def close(self) -> None:
        """Idempotent: the reporter and the run engine may both close it."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            if self._tb_local is not None:
                self._sync_tensorboard()
            self._writer.close()


def _step_of(line: str, key: str = "step") -> int:
    try:
        return int(json.loads(line)[key])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable trailing line of a killed run: drop it


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


def last_logged(path: str | Path) -> dict:
    """The last record of a metrics.jsonl ({} when there is none), `train.final_eval`'s report aside."""
    records = [r for r in read_metrics(path) if not r.get("final_eval")]
    return records[-1] if records else {}


def read_metrics(path: str | Path) -> list[dict]:
    if not storage.exists(path):
        return []
    records = []
    for line in storage.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


_LABELS = {"loss": "loss", "z_loss": "max-z term", "reward_accuracy": "reward accuracy"}


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "",
              keys: tuple[str, ...] = ("loss", "z_loss")) -> Path | None:
    """`keys` (default: the loss and, when non-zero, the max-z term) against step from metrics.jsonl, saved
    as a PNG; None when nothing was logged. Uses no pyplot state, so a notebook's own plots are unaffected."""
    records = read_metrics(metrics_path)
    series = {key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))] for key in keys}
    series = {key: points for key, points in series.items() if any(value for _, value in points)}
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in series.items():
        ax.plot([step for step, _ in points], [value for _, value in points], label=_LABELS.get(key, key))
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(_LABELS.get(key, key) for key in series))
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with storage.open(png_path, "wb") as f:
        fig.savefig(f, format="png")
    return storage.path(png_path)


# Logged as means over the log interval; every other metric is the interval's last value.
AVERAGED = ("loss", "z_loss", "objective", "grad_norm")


class Reporter:
    """Turns each step's fetched metrics into: non-finite counters, throughput and MFU, the progress bar,
    an `on_step` callback, and every `every` steps a line in the MetricsLog."""

    def __init__(self, log: MetricsLog, *, every: int, total: int, start_step: int, tokens_per_step: int,
                 flops_per_token: float, num_devices: int, peak_flops: float | None, nan_skipped: int = 0,
                 progress: bool = False, desc: str = "train", on_step=None, data_stats=None):
        self.log, self.every, self.total = log, every, total
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.num_devices, self.peak = num_devices, peak_flops
        self.on_step, self.data_stats = on_step, data_stats
        self.nan_skipped, self.nan_streak = nan_skipped, 0
        self.last: dict = {}
        self._window: dict[str, float] = {}
        self._since, self._steps = None, 0  # throughput counts from the first compiled step
        self._bar = None
        if progress and start_step < total:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def __call__(self, step: int, metrics: dict) -> dict:
        from jaxllm.train.flops import mfu

        values = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        skipped = bool(values.get("skipped"))
        self.nan_skipped += skipped
        self.nan_streak = self.nan_streak + 1 if skipped else 0
        values["nan_skipped"] = self.nan_skipped
        self._window["count"] = self._window.get("count", 0) + 1
        for key in AVERAGED:
            if key in values:
                self._window[key] = self._window.get(key, 0.0) + values[key]
        if self._since is not None:
            self._steps += 1
            tps = self.tokens_per_step * self._steps / max(now - self._since, 1e-9)
            values.update(tokens_per_s=tps, tokens_per_s_per_device=tps / self.num_devices)
            utilisation = mfu(tps, self.flops_per_token, self.num_devices, self.peak)
            if utilisation is not None:
                values["mfu"] = utilisation
        self.last = values
        if self.on_step is not None:
            self.on_step(step, values)
        if self._bar is not None:
            post = {"loss": f"{values.get('loss', float('nan')):.3f}"}
            if "tokens_per_s" in values:
                post["tok/s"] = f"{values['tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(step - self._bar.n)
        if step % self.every == 0 or step == self.total:
            self._write(step)
            self._since, self._steps = time.perf_counter(), 0
        elif self._since is None:
            self._since, self._steps = now, 0
        return values

    def _write(self, step: int) -> None:
        count = self._window.pop("count")
        means = {k: v / count for k, v in self._window.items()}
        data = {f"data/{k}": v for k, v in self.data_stats().items()} if self.data_stats else {}
        self.log.write(step, {**self.last, **means, **data, "tokens": step * self.tokens_per_step})
        self._window.clear()

    def flush(self, step: int) -> None:
        """Log the steps since the last record (a run stopped by a signal, NaNs or the end of its data)."""
        if self._window.get("count"):
            self._write(step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.log.close()
