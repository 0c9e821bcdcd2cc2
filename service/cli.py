"""The ``nstudent`` command line."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

# Plain tracebacks: the control plane reports the last exception line of a failed job's log as its error.
app = typer.Typer(help="Noisy Student pseudo-labeling and dataset curation on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
# Wide enough for the results table when the output is a file or a CI log.
console = Console(width=None if Console().is_terminal else 120)


def _progress(started: float):
    def show(message: str) -> None:
        console.print(f"[dim]{time.time() - started:6.0f}s[/dim]  {message}")

    return show


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run folder: data, models, datasets, results.json"),
    generations: int = typer.Option(3, min=1, help="noisy-student generations after the teacher"),
    seed: int = typer.Option(0, help="seed of training and curation"),
    teacher_steps: int = typer.Option(400, min=1),
    student_steps: int = typer.Option(1000, min=1),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default: a new local one"),
) -> None:
    """Run the Noisy Student loop on the bundled MNIST digits (local Ray, CPU or GPU)."""
    from service import cluster, demo as demo_lib

    started = time.time()
    show = _progress(started)
    show("starting Ray")
    cluster.connect(ray_address)
    rows = demo_lib.run(str(out), generations=generations, seed=seed, teacher_steps=teacher_steps,
                        student_steps=student_steps, progress=show)
    table = Table(title=f"Noisy Student on MNIST digits, 100 labels (seed {seed})")
    for col in ("gen", "role", "architecture", "params", "pseudo-labels kept", "pseudo-label acc", "test acc", "time"):
        table.add_column(col, justify="right" if col not in ("role", "architecture") else "left")
    for r in rows:
        table.add_row(
            str(r.generation), r.role, r.architecture, f"{r.parameters:,}",
            "-" if r.pseudo_labels_kept is None else f"{r.pseudo_labels_kept:,}",
            "-" if r.pseudo_label_accuracy is None else f"{r.pseudo_label_accuracy:.2%}",
            f"{r.test_accuracy:.2%}", f"{r.seconds:.0f}s",
        )
    console.print(table)
    console.print(f"artifacts: {out.resolve()}  (results.json, gen-*/model, gen-*/dataset/stats.json)")
    console.print(f"total: {time.time() - started:.0f}s")


@app.command()
def generation(
    spec: Path = typer.Argument(..., help="JSON file of a GenerationSpec"),
    generation_id: str = typer.Option("generation", help="id recorded in the outputs"),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS"),
) -> None:
    """Run one whole generation from a spec in this process (the control plane runs it as separate jobs)."""
    from service import cluster, pipeline
    from service.specs import GenerationSpec

    parsed = GenerationSpec.model_validate_json(spec.read_text())
    cluster.connect(ray_address)
    result = pipeline.run_generation(parsed, generation_id, progress=_progress(time.time()))
    console.print_json(json.dumps({"model": result.student.model_uri, "metrics": result.student.metrics,
                                   "dataset": result.dataset.manifest_uri}))


job_app = typer.Typer(help="Ray job entry points: what the control plane submits for each stage.", no_args_is_help=True)
app.add_typer(job_app, name="job")


AttemptId = typer.Option("", help="Ray submission id of this attempt: error.json goes under jobs/<it>/")


@contextlib.contextmanager
def _job(spec_uri: str, attempt_id: str):
    """The generation's spec, on a connected cluster. An exception that ends the job is reported first in the
    attempt's ``error.json`` (user error or infrastructure), which tells the control plane whether to retry."""
    from service import cluster, failures, storage
    from service.specs import GenerationSpec

    output = spec_uri.rsplit("/", 1)[0]  # the spec lies in the output folder; until it is read
    try:
        spec = GenerationSpec.model_validate(storage.read_json(spec_uri))
        output = spec.output
        cluster.connect()
        yield spec
    except BaseException as e:
        if attempt_id and isinstance(e, Exception):
            reported = failures.report(output, attempt_id, e)
            console.print(f"{attempt_id}: {reported.kind} error: {reported.message}", soft_wrap=True)
        raise


@job_app.command("teacher")
def job_teacher(spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
                generation_id: str = typer.Option(...), attempt_id: str = AttemptId) -> None:
    """Train the teacher on the labeled source (a generation with no teacher)."""
    from service import pipeline

    with _job(spec, attempt_id) as parsed:
        result = pipeline.teacher_stage(parsed)
    console.print_json(result.model_dump_json())


@job_app.command("label")
def job_label(spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
              generation_id: str = typer.Option(...), dataset_id: str = typer.Option(...),
              attempt_id: str = AttemptId) -> None:
    """Label the unlabeled pool with the teacher and curate a manifest (Ray Data)."""
    from service import pipeline

    with _job(spec, attempt_id) as parsed:
        labeling, dataset = pipeline.label_stage(parsed, generation_id, dataset_id, _progress(time.time()))
    console.print_json(json.dumps({"labeling": labeling.model_dump(), "manifest": dataset.manifest_uri}))


@job_app.command("train")
def job_train(spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
              generation_id: str = typer.Option(...), attempt_id: str = AttemptId) -> None:
    """Fit the noisy student on the labeled source and the curated manifest (Ray Train)."""
    from curation.layout import Layout
    from curation.stats import DatasetStats
    from service import pipeline, storage

    with _job(spec, attempt_id) as parsed:
        dataset = DatasetStats.model_validate(storage.read_json(Layout(parsed.output).stats))
        result = pipeline.student_stage(parsed, dataset)
    console.print_json(result.model_dump_json())


@app.command()
def serve(
    host: str = typer.Option(None, help="default: NSTUDENT_HOST or 127.0.0.1"),
    port: int = typer.Option(None, help="default: NSTUDENT_PORT or 8000"),
) -> None:
    """Run the control plane: the REST API, and the orchestrator that submits and follows Ray jobs.

    With no RAY_ADDRESS it starts a local Ray head (with its Jobs API) under the data directory.
    """
    from service import server
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    server.run(Settings(**overrides), log=console.print)


@app.command()
def index(
    source: str = typer.Argument(..., help="folder or s3:// prefix of images"),
    out: str = typer.Argument(..., help="the manifest to write: a .parquet path or s3:// URI"),
) -> None:
    """List a folder or prefix once into a Parquet manifest of (image_id, uri), the unlabeled source to use
    for a large pool: labeling reads it in parallel and never lists the pool again."""
    from curation import sources

    if not out.endswith(".parquet"):
        raise typer.BadParameter("the manifest's name must end in .parquet", param_hint="OUT")
    started = time.time()
    rows = sources.index(source, out)
    console.print(f"{rows:,} files listed into {out} in {time.time() - started:.1f}s")


if __name__ == "__main__":
    app()
