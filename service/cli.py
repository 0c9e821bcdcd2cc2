"""The ``nstudent`` command line."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

# Plain tracebacks: the control plane reports the last exception line of a failed job's log as its error.
app = typer.Typer(
    help="Noisy Student pseudo-labeling and dataset curation on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
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
    from service import cluster
    from service import demo as demo_lib
    from service.progress_view import FollowProgressFile, StageBars

    started = time.time()
    show = _progress(started)
    show("starting Ray")
    cluster.connect(ray_address)
    with StageBars(console) as bars:  # live bars of each stage, from the progress files its jobs write
        rows = demo_lib.run(
            str(out),
            generations=generations,
            seed=seed,
            teacher_steps=teacher_steps,
            student_steps=student_steps,
            progress=show,
            follow=lambda uri, name: FollowProgressFile(bars, uri, name),
        )
    table = Table(title=f"Noisy Student on MNIST digits, 100 labels (seed {seed})")
    for col in (
        "gen",
        "role",
        "architecture",
        "params",
        "pseudo-labels kept",
        "pseudo-label acc",
        "val acc",
        "test acc",
        "mCE",
        "flip rate",
        "time",
    ):
        table.add_column(col, justify="right" if col not in ("role", "architecture") else "left")
    for r in rows:
        table.add_row(
            str(r.generation),
            r.role,
            r.architecture,
            f"{r.parameters:,}",
            "-" if r.pseudo_labels_kept is None else f"{r.pseudo_labels_kept:,}",
            "-" if r.pseudo_label_accuracy is None else f"{r.pseudo_label_accuracy:.2%}",
            f"{r.validation_accuracy:.2%}",
            f"{r.test_accuracy:.2%}",
            "-" if r.mce is None else f"{r.mce:.1f}",
            "-" if r.flip_rate is None else f"{r.flip_rate:.2%}",
            f"{r.seconds:.0f}s",
        )
    console.print(table)
    console.print(f"artifacts: {out.resolve()}  (results.json, plots/*.png, gen-*/model, gen-*/dataset/stats.json)")
    console.print(f"total: {time.time() - started:.0f}s")


@app.command()
def experiment(
    out: Path = typer.Option(Path("runs/experiment"), help="run folder: one sub-folder per seed, experiment.json"),
    seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="seeds (each changes the labeled digits too)"),
    generations: int = typer.Option(3, min=1, help="noisy-student generations after the teacher"),
    teacher_steps: int = typer.Option(400, min=1),
    student_steps: int = typer.Option(1000, min=1),
    robustness_images: int = typer.Option(500, min=0, help="test images each model's robustness suites run on"),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster; default: a new local one"),
) -> None:
    """Compare the demo's students with a budget-matched supervised baseline and with the paper's ablations
    (no noise, hard labels, no balancing, a larger student) over seeds; print one table (mean +- sd)."""
    from service import cluster
    from service import experiment as experiment_lib

    started = time.time()
    show = _progress(started)
    show("starting Ray")
    cluster.connect(ray_address)
    rows = experiment_lib.run(
        str(out),
        list(seeds),
        generations=generations,
        teacher_steps=teacher_steps,
        student_steps=student_steps,
        robustness_images=robustness_images,
        progress=show,
    )
    lines = experiment_lib.table(rows)
    (out / "table.json").write_text(json.dumps(lines, indent=2))
    table = Table(
        title=f"Noisy Student on MNIST digits, 100 labels, seeds {', '.join(map(str, seeds))}",
        caption="gain: test accuracy minus the mean of the budget-matched supervised baseline's two draws",
        box=box.SIMPLE_HEAD,
    )
    for col in ("arm", "params", "steps", "val acc", "val loss", "test acc", "gain", "mCE", "mFR"):
        table.add_column(col, justify="left" if col == "arm" else "right")

    def cell(line: dict[str, Any], name: str, scale: float = 100.0, signed: bool = False, places: int = 2) -> str:
        if line[name] is None:
            return "-"
        mean, sd = line[name] * scale, line[f"{name}_sd"] * scale
        return f"{mean:+.{places}f} ± {sd:.{places}f}" if signed else f"{mean:.{places}f} ± {sd:.{places}f}"

    for line in lines:
        table.add_row(
            line["arm"],
            f"{line['parameters']:,}",
            str(line["steps"]),
            cell(line, "validation_accuracy"),
            cell(line, "validation_loss", 1.0, places=3),
            cell(line, "test_accuracy"),
            cell(line, "gain_over_supervised", signed=True),
            cell(line, "mce", 1.0),
            cell(line, "mfr", 1.0),
        )
    console.print(table, width=max(console.width, 130))  # whole figures in a narrow terminal too: its lines wrap
    console.print(f"artifacts: {out.resolve()}  (experiment.json, table.json, seed-*/)")
    console.print(f"total: {time.time() - started:.0f}s")


@app.command()
def plots(
    run: Path = typer.Argument(Path("runs/demo"), help="a demo run folder (results.json, gen-*/dataset)"),
) -> None:
    """Write (again) the PNG plots of a demo run into <run>/plots: accuracy, curation, confidence."""
    from service import plots as plots_lib

    if not (run / "results.json").exists():
        errors.print(
            f"error: {run} has no results.json: run `nstudent demo --out {run}` first", markup=False, soft_wrap=True
        )
        raise typer.Exit(1)
    for path in plots_lib.write_run_plots(str(run)):
        console.print(path, highlight=False)


@app.command()
def generation(
    spec: Path = typer.Argument(..., help="JSON file of a GenerationSpec"),
    generation_id: str = typer.Option("generation", help="id recorded in the outputs"),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS"),
) -> None:
    """Run one whole generation from a spec in this process (the control plane runs it as separate jobs)."""
    from curation.layout import Layout
    from service import cluster, pipeline
    from service.progress_view import FollowProgressFile, StageBars
    from service.specs import GenerationSpec

    parsed = GenerationSpec.model_validate_json(spec.read_text())
    cluster.connect(ray_address)
    with StageBars(console) as bars, FollowProgressFile(bars, Layout(parsed.output).progress):
        result = pipeline.run_generation(parsed, generation_id, progress=_progress(time.time()))
    console.print_json(
        json.dumps(
            {
                "model": result.student.model_uri,
                "metrics": result.student.metrics,
                "dataset": result.dataset.manifest_uri,
            }
        )
    )


job_app = typer.Typer(help="Ray job entry points: what the control plane submits for each stage.", no_args_is_help=True)
app.add_typer(job_app, name="job")


AttemptId = typer.Option("", help="Ray submission id of this attempt: error.json goes under jobs/<it>/")


@contextlib.contextmanager
def _job(spec_uri: str, attempt_id: str):
    """The generation's spec, on a connected cluster. An exception that ends the job is reported first in the
    attempt's ``error.json`` (user error or infrastructure), which tells the control plane whether to retry."""
    from curation import storage
    from service import cluster, failures
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
def job_teacher(
    spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
    generation_id: str = typer.Option(...),
    attempt_id: str = AttemptId,
) -> None:
    """Train the teacher on the labeled source (a generation with no teacher)."""
    from service import pipeline

    with _job(spec, attempt_id) as parsed:
        result = pipeline.teacher_stage(parsed)
    console.print_json(result.model_dump_json())


@job_app.command("label")
def job_label(
    spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
    generation_id: str = typer.Option(...),
    dataset_id: str = typer.Option(...),
    attempt_id: str = AttemptId,
) -> None:
    """Label the unlabeled pool with the teacher and curate a manifest (Ray Data)."""
    from service import pipeline

    with _job(spec, attempt_id) as parsed:
        labeling, dataset = pipeline.label_stage(parsed, generation_id, dataset_id, _progress(time.time()))
    console.print_json(json.dumps({"labeling": labeling.model_dump(), "manifest": dataset.manifest_uri}))


@job_app.command("train")
def job_train(
    spec: str = typer.Argument(..., help="URI of the generation's spec.json"),
    generation_id: str = typer.Option(...),
    attempt_id: str = AttemptId,
) -> None:
    """Fit the noisy student on the labeled source and the curated manifest (Ray Train)."""
    from curation import storage
    from curation.layout import Layout
    from curation.stats import DatasetStats
    from service import pipeline

    with _job(spec, attempt_id) as parsed:
        dataset = DatasetStats.model_validate(storage.read_json(Layout(parsed.output).stats))
        model, unfinetuned = pipeline.student_stage(parsed, dataset)
    console.print_json(
        json.dumps({"model": model.model_dump(), "unfinetuned": unfinetuned.model_dump() if unfinetuned else None})
    )


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

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
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


def _floats3(text: str | None, name: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter("three comma-separated numbers, e.g. 0.485,0.456,0.406", param_hint=name)
    return values  # type: ignore[return-value]


@app.command("import-model")
def import_model(
    out: str = typer.Argument(..., help="the model folder to write (folder or s3:// URI)"),
    architecture: str = typer.Option(
        ..., "--architecture", "-a", help="timm model name; with --from-hf-cache it may carry a tag (resnet50.a1_in1k)"
    ),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="weights: .safetensors, or a PyTorch state dict (loaded with weights_only=True)"
    ),
    from_hf_cache: bool = typer.Option(
        False,
        "--from-hf-cache",
        help="take timm's pretrained weights from the local Hugging Face cache (never downloaded)",
    ),
    classes: str | None = typer.Option(None, "--classes", help="class names, comma-separated, in output order"),
    classes_file: Path | None = typer.Option(
        None, "--classes-file", exists=True, dir_okay=False, help="class names, one a line, in output order"
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=1, help="the number of outputs; checked against the class names"
    ),
    input_size: int | None = typer.Option(None, "--input-size", help="square input side in pixels"),
    crop_pct: float | None = typer.Option(None, "--crop-pct", help="resize to size/crop_pct, then centre-crop"),
    mean: str | None = typer.Option(None, "--mean", help="per-channel mean, e.g. 0.485,0.456,0.406"),
    std: str | None = typer.Option(None, "--std", help="per-channel standard deviation, e.g. 0.229,0.224,0.225"),
    model_kwargs: str | None = typer.Option(
        None, "--model-kwargs", help="extra timm.create_model arguments as JSON (allow-listed)"
    ),
) -> None:
    """Make a model folder from a model trained elsewhere, to use as a generation's teacher. Preprocessing not
    given comes from timm's pretrained config for the architecture."""
    import os

    # Before huggingface_hub is imported (by timm, below): nothing may be fetched from the Hub at run time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    if (classes is None) == (classes_file is None):
        raise typer.BadParameter("give one of --classes or --classes-file")
    if (checkpoint is None) == (not from_hf_cache):
        raise typer.BadParameter("give one of --checkpoint or --from-hf-cache")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
    else:
        assert classes_file is not None  # one of the two, checked above
        names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if num_classes is not None and num_classes != len(names):
        raise typer.BadParameter(f"{len(names)} class names for {num_classes} classes", param_hint="--num-classes")
    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else {}
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint="--model-kwargs") from None
    if not isinstance(kwargs, dict):
        raise typer.BadParameter("a JSON object", param_hint="--model-kwargs")

    from trainer import models

    try:
        meta = models.import_model(
            out,
            architecture=architecture,
            class_names=names,
            checkpoint=checkpoint,
            cached=from_hf_cache,
            input_size=input_size,
            crop_pct=crop_pct,
            mean=_floats3(mean, "--mean"),
            std=_floats3(std, "--std"),
            model_kwargs=kwargs,
        )
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)  # one unwrapped line, for scripts and job logs
        raise typer.Exit(1) from None
    console.print(
        f"model folder {out}: {meta.architecture}, {meta.num_classes} classes, "
        f"{meta.parameters:,} parameters, input {meta.input_size}px"
    )


# --- the REST API's client: `nstudent generations ...`, `nstudent datasets ...` -------------------------

generations_app = typer.Typer(help="Generations on an nstudent server, through its REST API.", no_args_is_help=True)
datasets_app = typer.Typer(
    help="Datasets (curation statistics and manifests) on an nstudent server.", no_args_is_help=True
)
app.add_typer(generations_app, name="generations")
app.add_typer(datasets_app, name="datasets")
errors = Console(stderr=True)

UrlOption = typer.Option("http://127.0.0.1:8000", "--url", envvar="NSTUDENT_URL", help="the nstudent server")
TokenOption = typer.Option(
    None,
    "--token",
    envvar="NSTUDENT_TOKEN",
    show_default=False,
    help="API token; default: NSTUDENT_TOKEN, else <NSTUDENT_DATA_DIR>/api-token",
)
JsonOption = typer.Option(False, "--json", help="print the API's JSON instead of tables")
# How long `watch` keeps asking a server that does not answer: a restart or a rolling upgrade of the control
# plane takes seconds to a minute.
WATCH_PATIENCE = 300.0


@contextlib.contextmanager
def _api(url: str, token: str | None):
    """A client of the server; any failure ends the command with one line on stderr and exit status 1."""
    from service.client import ApiError, Client, default_token

    try:
        with Client(url, token or default_token()) as client:
            yield client
    except ApiError as e:
        errors.print(f"error: {e}", soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(1) from None


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _progress_text(g: dict) -> str:
    p = g.get("progress") or {}
    if g["stage"] in ("succeeded", "failed", "cancelled"):
        return ""
    if p.get("steps"):
        loss = f" loss {p['loss']:.3f}" if p.get("loss") is not None else ""
        return f"step {p.get('step') or 0:,}/{p['steps']:,}{loss}"
    if p.get("total"):
        return f"{p.get('done') or 0:,}/{p['total']:,} images"
    return ""


def _accuracy(g: dict) -> str:
    acc = (g.get("metrics") or {}).get("test_accuracy")
    return "" if acc is None else f"{acc:.2%}"


@generations_app.command("create")
def generations_create(
    spec: Path = typer.Argument(
        ..., help="JSON body of POST /generations (sources, student, iterations, ...); - for stdin"
    ),
    idempotency_key: str = typer.Option(None, help="repeat-safe key: the same key returns the same generations"),
    watch: bool = typer.Option(False, "--watch", help="then follow the generations with live progress bars"),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Start a generation (or a chain of them) from a JSON request body."""
    import sys

    try:
        body = json.loads(sys.stdin.read() if str(spec) == "-" else spec.read_text())
    except (OSError, ValueError) as e:
        errors.print(f"error: cannot read {spec}: {e}", soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(1) from None
    with _api(url, token) as client:
        accepted = client.create(body, idempotency_key)
        if as_json and not watch:
            _print_json(accepted)
            return
        if not as_json:
            console.print(f"created {', '.join(accepted['chain'])}", highlight=False)
        if watch:
            _watch(client, accepted["chain"], as_json, 1.0)


@generations_app.command("list")
def generations_list(
    stage: str = typer.Option(None, help="only generations at this stage"),
    limit: int = typer.Option(50, min=1, max=1000),
    offset: int = typer.Option(0, min=0),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """Generations, newest first."""
    with _api(url, token) as client:
        page = client.generations(offset, limit, stage)
    if as_json:
        _print_json(page)
        return
    first, last = offset + 1 if page["data"] else 0, offset + len(page["data"])
    table = Table(title=f"generations {first}-{last} of {page['count']}")
    for col in ("id", "stage", "chain", "progress", "test acc", "created", "error"):
        table.add_column(col, justify="right" if col in ("test acc",) else "left")
    for g in page["data"]:
        table.add_row(
            g["id"],
            g["stage"],
            f"{g['chain_id']} #{g['chain_index']}",
            _progress_text(g),
            _accuracy(g),
            g["created_at"][:19].replace("T", " "),
            (g.get("error") or "")[:60],
        )
    console.print(table)


@generations_app.command("show")
def generations_show(
    generation_id: str = typer.Argument(...), url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """A generation: stage, progress, jobs, timings, metrics, dataset and model."""
    with _api(url, token) as client:
        g = client.generation(generation_id)
    if as_json:
        _print_json(g)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("id", g["id"]),
        ("stage", g["stage"] + (" (cancel requested)" if g["cancel_requested"] else "")),
        ("chain", f"{g['chain_id']} #{g['chain_index']}"),
        ("parent", g.get("parent_id") or "-"),
        ("progress", _progress_text(g) or "-"),
        ("teacher", g.get("teacher_uri") or "-"),
        ("dataset", g.get("dataset_id") or "-"),
        ("model", g.get("model_uri") or "-"),
        ("output", g["output"]),
        ("retries", str(g["retries"])),
    ]
    for stage, t in (g.get("timings") or {}).items():
        rows.append((f"time {stage}", f"{t['seconds']:.1f}s" if t.get("seconds") is not None else "running"))
    for name, value in sorted((g.get("metrics") or {}).items()):
        shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
        rows.append((name, f"{value:.2%}" if name.endswith("accuracy") else shown))
    for kind, attempts in (g.get("jobs") or {}).items():
        tries = [f"{a['id']} {a['status']}" + (f" ({a['cause']})" if a.get("cause") else "") for a in attempts]
        rows.append((f"job {kind}", ", ".join(tries)))
    if g.get("error"):
        rows.append(("error", g["error"]))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table, highlight=False)


def _watch(client, ids: list[str], as_json: bool, interval: float, patience: float = WATCH_PATIENCE) -> None:
    from service.progress_view import StageBars, watch_generations

    on_change = (lambda g: print(json.dumps(g, default=str), flush=True)) if as_json else None
    quiet = Console(quiet=True) if as_json else console
    try:
        with StageBars(quiet) as bars:
            final = watch_generations(client.generation, ids, bars, interval, on_change, patience)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if any(g["stage"] != "succeeded" for g in final):
        raise typer.Exit(1)


@generations_app.command("watch")
def generations_watch(
    generation_ids: list[str] = typer.Argument(..., help="one or more generation ids (g-...)"),
    interval: float = typer.Option(1.0, min=0.1, help="seconds between polls"),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = typer.Option(False, "--json", help="print each change of a generation as one JSON line"),
    patience: float = typer.Option(
        WATCH_PATIENCE,
        min=0,
        help="seconds to keep asking while the server does not answer or answers 502/503/504 (a restart, an "
        "upgrade, a database failover); 0: fail at once",
    ),
) -> None:
    """Follow generations until they finish, with live progress bars: labeling (images, rate, ETA), training
    (step, loss, images/s, ETA) and each stage's time. Exit status 0 when all succeeded, else 1."""
    with _api(url, token) as client:
        _watch(client, generation_ids, as_json, interval, patience)


@generations_app.command("cancel")
def generations_cancel(
    generation_id: str = typer.Argument(...), url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """Stop a generation's running job; the generations chained after it are cancelled too."""
    with _api(url, token) as client:
        g = client.cancel(generation_id)
    if as_json:
        _print_json(g)
    else:
        console.print(f"{g['id']}: cancel requested (stage {g['stage']})", highlight=False)


@generations_app.command("retry")
def generations_retry(
    generation_id: str = typer.Argument(...), url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """Run a failed or cancelled generation again, from what its jobs left in storage."""
    with _api(url, token) as client:
        g = client.retry(generation_id)
    if as_json:
        _print_json(g)
    else:
        console.print(f"{g['id']}: {g['stage']} again (retry {g['retries']})", highlight=False)


@datasets_app.command("show")
def datasets_show(
    dataset_id: str = typer.Argument(...), url: str = UrlOption, token: str = TokenOption, as_json: bool = JsonOption
) -> None:
    """Curation statistics: per class before and after filtering, thresholds, rejects, the manifest."""
    with _api(url, token) as client:
        d = client.dataset(dataset_id)
    if as_json:
        _print_json(d)
        return
    rejected = ", ".join(f"{k} {v:,}" for k, v in sorted(d["rejected"].items())) or "none"
    console.print(
        f"{d['dataset_id']} (generation {d['generation_id']}): {d['images_seen']:,} images seen, "
        f"{d['images_decoded']:,} decoded, rejected: {rejected}",
        highlight=False,
    )
    console.print(
        f"K = {d['images_per_class']:,} per class, confidence floor {d['config']['confidence_floor']}; "
        f"manifest {d['manifest_rows']:,} rows ({d['manifest_copies']:,} with copies) at "
        f"{d['manifest_uri']}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for col in ("class", "predicted", "above floor", "threshold", "eligible", "kept", "copies"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in d["classes"]:
        table.add_row(
            c["class_name"],
            f"{c['predicted']:,}",
            f"{c['above_floor']:,}",
            f"{c['threshold']:.2f}",
            f"{c['eligible']:,}",
            f"{c['kept']:,}",
            f"{c['copies']:,}",
        )
    console.print(table)


@datasets_app.command("manifest")
def datasets_manifest(
    dataset_id: str = typer.Argument(...),
    offset: int = typer.Option(0, min=0),
    limit: int = typer.Option(20, min=1, max=1000),
    url: str = UrlOption,
    token: str = TokenOption,
    as_json: bool = JsonOption,
) -> None:
    """A page of a dataset's manifest: image id, URI, pseudo-label, confidence, copies."""
    with _api(url, token) as client:
        page = client.manifest(dataset_id, offset, limit)
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"rows {offset + 1 if page['data'] else 0}-{offset + len(page['data'])} of {page['count']:,}")
    for col in ("image_id", "label", "confidence", "copies", "uri"):
        table.add_column(col, justify="left" if col == "uri" else "right")
    for r in page["data"]:
        table.add_row(str(r["image_id"]), str(r["label"]), f"{r['confidence']:.3f}", str(r["copies"]), r["uri"])
    console.print(table)


if __name__ == "__main__":
    app()
