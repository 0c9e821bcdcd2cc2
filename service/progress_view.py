"""Live progress of a generation's stages on a terminal: one rich bar per stage.

Contract: ``StageBars.update(key, title, progress)`` shows a stage's latest ``curation.layout.Progress``
(labeling: images done of total with rate and ETA; training: step of steps, loss, images/s and ETA;
curating and evaluating: a spinner) and ``finish(key, seconds)`` freezes that stage's bar with its time.
On a terminal the bars redraw in place; anywhere else (a pipe, a CI log) each change is printed as a line,
at most one per stage every ``line_seconds``, so a long stage is never silent and a log is never flooded.
Two feeds drive the bars: ``watch_generations`` polls the REST API (``nstudent generations watch``), and
``FollowProgressFile`` polls a generation's ``progress.json`` (the demo and ``nstudent generation``, which
run the stages in their own process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from curation.layout import Progress, read_progress

# The API's stages in the order they run, and how a bar names each.
STAGE_TITLES = {
    "queued": "queued",
    "training_teacher": "teacher",
    "labeling": "labeling",
    "curating": "curating",
    "training": "training",
    "evaluating": "evaluating",
}
FINISHED = ("succeeded", "failed", "cancelled")
# Stages (and job phases) with a count to show; the others (queued, curating, evaluating) show a spinner.
COUNTED = ("training_teacher", "labeling", "training")


def _count(task: Task) -> str:
    fields = task.fields
    if fields.get("seconds") is not None:
        return f"done in {fields['seconds']:.0f}s"
    if task.total is None:
        return ""
    unit = fields.get("unit", "")
    return f"{int(task.completed):,}/{int(task.total):,}{unit}"


def _detail(task: Task) -> str:
    """Rate (and loss while training); the labeling rate is measured here from the counts' changes."""
    fields = task.fields
    if fields.get("seconds") is not None:
        return ""
    parts = []
    if fields.get("loss") is not None:
        parts.append(f"loss {fields['loss']:.3f}")
    rate = fields.get("images_per_second")
    if rate is None and fields.get("unit") == " images" and task.speed:
        rate = task.speed
    if rate is not None:
        parts.append(f"{rate:,.0f} img/s")
    return "  ".join(parts)


class _Column(ProgressColumn):
    def __init__(self, render: Callable[[Task], str], style: str = ""):
        super().__init__()
        self.fn, self.style = render, style

    def render(self, task: Task) -> Text:
        return Text(self.fn(task), style=self.style)


class _Eta(TimeRemainingColumn):
    """ETA while a counted stage runs; nothing for a finished one or one with no count."""

    def render(self, task: Task) -> Text:
        if task.total is None or task.fields.get("seconds") is not None or not task.completed:
            return Text("")
        return Text("ETA ") + super().render(task)


class StageBars:
    def __init__(self, console: Console, line_seconds: float = 10.0):
        self.console, self.line_seconds = console, line_seconds
        self.live = console.is_terminal
        self.bars = RichProgress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=30),
            _Column(_count),
            _Eta(compact=True),
            _Column(_detail, style="cyan"),
            console=console,
            refresh_per_second=4,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.last_line: dict[str, tuple[float, str]] = {}

    def __enter__(self) -> StageBars:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bars.stop()

    def print(self, message: str) -> None:
        """A line above the bars (or in the log)."""
        self.console.print(message, soft_wrap=True, highlight=False, markup=False)

    def _task(self, key: str, title: str) -> TaskID:
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(title, total=None, start=True)
        return self.tasks[key]

    def update(self, key: str, title: str, progress: Progress | None) -> None:
        """Show ``progress`` on the bar of stage ``key`` (made on first use, titled ``title``)."""
        task = self._task(key, title)
        p = progress or Progress()
        if p.steps:
            self.bars.update(
                task,
                total=p.steps,
                completed=p.step or 0,
                unit=" steps",
                loss=p.loss,
                images_per_second=p.images_per_second,
            )
        elif p.total:
            self.bars.update(task, total=p.total, completed=p.done or 0, unit=" images")
        self._line(key, title)

    def finish(self, key: str, title: str, seconds: float | None) -> None:
        task = self._task(key, title)
        if self.bars.tasks[task].fields.get("seconds") is not None:
            return
        total = self.bars.tasks[task].total
        self.bars.update(task, total=total or 1, completed=total or 1, seconds=seconds or 0.0)
        self.bars.stop_task(task)
        self._line(key, title, force=True)

    def _line(self, key: str, title: str, force: bool = False) -> None:
        """Off a terminal: the bar as one line, when it changed and enough time has passed (or ``force``)."""
        if self.live:
            return
        task = self.bars.tasks[self.tasks[key]]
        text = "  ".join(t for t in (title, _count(task), _detail(task)) if t)
        at, shown = self.last_line.get(key, (0.0, ""))
        now = time.monotonic()
        if text != shown and (force or not shown or now - at >= self.line_seconds):
            self.console.print(text, soft_wrap=True, highlight=False)
            self.last_line[key] = (now, text)


def _seconds(timing: dict[str, Any]) -> float | None:
    return timing.get("seconds")


def show_generation(bars: StageBars, g: dict[str, Any], prefix: str = "") -> None:
    """Bars for one generation as the API returns it: every stage it has entered, finished ones with their time."""
    timings: dict[str, dict[str, Any]] = g.get("timings") or {}
    current = g["stage"]
    for stage, timing in sorted(timings.items(), key=lambda kv: kv[1].get("started") or ""):
        if stage not in STAGE_TITLES:
            continue
        key, title = f"{g['id']}/{stage}", f"{prefix}{STAGE_TITLES[stage]}"
        if stage == current and current not in FINISHED:
            bars.update(key, title, _counted(stage, g))
        elif timing.get("finished"):
            if stage != "queued":
                bars.finish(key, title, _seconds(timing))
    if current in STAGE_TITLES and current not in timings:
        bars.update(f"{g['id']}/{current}", f"{prefix}{STAGE_TITLES[current]}", _counted(current, g))


def _counted(stage: str, g: dict[str, Any]) -> Progress | None:
    return Progress.model_validate(g.get("progress") or {}) if stage in COUNTED else None


def summary(g: dict[str, Any]) -> str:
    """One line on a finished generation."""
    seconds = None
    if g.get("finished_at") and g.get("created_at"):
        from datetime import datetime

        seconds = (datetime.fromisoformat(g["finished_at"]) - datetime.fromisoformat(g["created_at"])).total_seconds()
    took = f" in {seconds:.0f}s" if seconds is not None else ""
    if g["stage"] == "succeeded":
        metrics = ", ".join(f"{k} {v:.2%}" for k, v in sorted(g.get("metrics", {}).items()) if k.endswith("accuracy"))
        return f"{g['id']} succeeded{took}" + (f": {metrics}" if metrics else "")
    return f"{g['id']} {g['stage']}{took}" + (f": {g['error']}" if g.get("error") else "")


def watch_generations(
    fetch: Callable[[str], dict[str, Any]],
    ids: list[str],
    bars: StageBars,
    poll_seconds: float = 1.0,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    patience: float = 0.0,
) -> list[dict[str, Any]]:
    """Follow generations through the API until every one has finished; returns their last states.

    A server that does not answer, or answers 502, 503 or 504 (a restart, a rolling upgrade, a database
    failover), is asked again every ``poll_seconds`` for up to ``patience`` seconds, with a line saying so;
    after that, or for any other error, ``fetch``'s ApiError is raised."""
    from service.client import ApiError

    last: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    unreachable_since: float | None = None
    while True:
        try:
            for gid in ids:
                if gid not in pending:
                    continue
                g = fetch(gid)
                if unreachable_since is not None:
                    bars.print(f"the server answers again (after {time.monotonic() - unreachable_since:.0f}s)")
                    unreachable_since = None
                if on_change is not None and g != last.get(gid):
                    on_change(g)
                last[gid] = g
                show_generation(bars, g, f"{gid} " if len(ids) > 1 else "")
                if g["stage"] in FINISHED:
                    pending.remove(gid)
                    bars.print(summary(g))
        except ApiError as e:
            if e.status not in (None, 502, 503, 504):
                raise
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
                if patience > 0:
                    bars.print(f"{e}; asking again for up to {patience:.0f}s")
            if now - unreachable_since >= patience:
                raise
        if not pending:
            return [last[gid] for gid in ids]
        time.sleep(poll_seconds)


class FollowProgressFile:
    """While a stage runs in this process, show its ``progress.json`` (written by the job's code) as bars.

    Progress written before ``__enter__`` (a previous run into the same folder) is ignored. A change of
    phase finishes the previous phase's bar with the time it was seen running.
    """

    TITLES = {"labeling": "labeling", "curating": "curating", "training": "training", "evaluating": "evaluating"}

    def __init__(self, bars: StageBars, uri: str, prefix: str = "", every: float = 0.5):
        self.bars, self.uri, self.prefix, self.every = bars, uri, prefix, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress-bars", daemon=True)
        self.phase: str | None = None
        self.phase_started = 0.0
        self.phases = 0  # phases seen: a teacher's training and a student's are two bars
        self.started = 0.0

    def __enter__(self) -> FollowProgressFile:
        self.started = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._poll()
        if self.phase is not None:
            self._finish_phase()

    def _title(self, phase: str) -> str:
        return f"{self.prefix}{self.TITLES.get(phase, phase)}"

    def _finish_phase(self) -> None:
        self.bars.finish(self._key(), self._title(self.phase or ""), time.time() - self.phase_started)

    def _key(self) -> str:
        return f"{self.uri}/{self.phases}/{self.phase}"

    def _poll(self) -> None:
        p = read_progress(self.uri)
        if p is None or p.phase is None or (p.time or 0) < self.started:
            return
        phase = p.phase.value
        if phase != self.phase:
            if self.phase is not None:
                self._finish_phase()
            self.phase, self.phase_started, self.phases = phase, time.time(), self.phases + 1
        self.bars.update(self._key(), self._title(phase), p if phase in COUNTED else None)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self._poll()
            except Exception:  # bars are best effort: the stage goes on
                pass
