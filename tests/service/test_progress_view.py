"""The progress bars' two feeds, off a terminal (lines in a log): a generation followed through the API, and a
progress file written by a stage running in this process."""

import io
import time

from rich.console import Console

from curation.layout import Phase, write_progress
from service.progress_view import FollowProgressFile, StageBars, watch_generations


def log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=150, force_terminal=False), out


def generation(stage: str, progress: dict, timings: dict, **kw) -> dict:
    return {
        "id": "g-1",
        "stage": stage,
        "progress": progress,
        "timings": timings,
        "metrics": {},
        "error": None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "finished_at": None,
        **kw,
    }


def test_watch_prints_each_stage_with_its_counts_and_time():
    t0, t1, t2 = "2026-01-01T00:00:01+00:00", "2026-01-01T00:00:20+00:00", "2026-01-01T00:00:30+00:00"
    states = iter(
        [
            generation("labeling", {"phase": "labeling", "done": 0, "total": 4850}, {"labeling": {"started": t0}}),
            generation("labeling", {"phase": "labeling", "done": 1200, "total": 4850}, {"labeling": {"started": t0}}),
            generation(
                "training",
                {"phase": "training", "step": 7, "steps": 20, "loss": 1.23456, "images_per_second": 88.0},
                {"labeling": {"started": t0, "finished": t1, "seconds": 19.0}, "training": {"started": t1}},
            ),
            generation(
                "succeeded",
                {"phase": "evaluating", "step": 20, "steps": 20},
                {
                    "labeling": {"started": t0, "finished": t1, "seconds": 19.0},
                    "training": {"started": t1, "finished": t2, "seconds": 10.0},
                },
                metrics={"test_accuracy": 0.9612},
                finished_at=t2,
            ),
        ]
    )
    console, out = log_console()
    with StageBars(console, line_seconds=0) as bars:
        final = watch_generations(lambda gid: next(states), ["g-1"], bars, poll_seconds=0)
    text = out.getvalue()
    assert final[0]["stage"] == "succeeded"
    assert "labeling  0/4,850 images" in text and "labeling  1,200/4,850 images" in text
    assert "labeling  done in 19s" in text
    assert "training  7/20 steps  loss 1.235  88 img/s" in text and "training  done in 10s" in text
    assert "g-1 succeeded in 30s: test_accuracy 96.12%" in text


def test_off_a_terminal_a_running_stage_prints_at_most_a_line_per_interval():
    console, out = log_console()
    states = [
        generation("labeling", {"phase": "labeling", "done": d, "total": 100}, {"labeling": {"started": "x"}})
        for d in range(0, 100, 10)
    ]
    with StageBars(console, line_seconds=3600) as bars:
        for g in states:
            from service.progress_view import show_generation

            show_generation(bars, g)
    assert out.getvalue().count("labeling") == 1  # the first state only: the rest came within the interval


def test_a_progress_file_drives_the_bars_and_ignores_an_earlier_runs(tmp_path):
    uri = str(tmp_path / "progress.json")
    write_progress(uri, Phase.TRAINING, step=1000, steps=1000)  # left by an earlier run: not this one's
    time.sleep(0.01)
    console, out = log_console()
    with StageBars(console, line_seconds=0) as bars:
        with FollowProgressFile(bars, uri, "gen-1 ", every=3600) as follow:
            follow._poll()
            assert out.getvalue() == ""
            write_progress(uri, Phase.LABELING, done=10, total=40)
            follow._poll()
            write_progress(uri, Phase.LABELING, done=40, total=40)
            follow._poll()
            write_progress(uri, Phase.CURATING)
            follow._poll()
            write_progress(uri, Phase.TRAINING, step=3, steps=9, loss=0.5, images_per_second=12.0)
        # leaving the block polls once more and finishes the last phase
    text = out.getvalue()
    for line in (
        "gen-1 labeling  10/40 images",
        "gen-1 labeling  40/40 images",
        "gen-1 labeling  done in",
        "gen-1 curating  done in",
        "gen-1 training  3/9 steps  loss 0.500  12 img/s",
        "gen-1 training  done in",
    ):
        assert line in text, (line, text)
    assert "1,000/1,000" not in text
