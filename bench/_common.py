"""Shared pieces of the benchmarks: the machine record, a private local Ray cluster, memory and CPU samplers over
a process tree, measured phases in child processes, and synthetic photo-like JPEGs.

Every benchmark runs each measured phase in its own child process (``python bench/<name>.py --phase ...``),
so that one phase's memory, threads or Ray cluster never leaks into the next, and the parent samples the
child's whole process tree (a local Ray cluster's processes are all descendants of its driver).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Where generated inputs are kept between runs (JPEG pools, synthetic predictions): regenerating them is slow.
DATA_DIR = Path(os.environ.get("NSTUDENT_BENCH_DATA", "/tmp/nstudent-bench"))
# Memory and CPU time are sampled this often (seconds).
SAMPLE_SECONDS = 0.2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def labeling_arguments(
    description: str, *, source_size: int, arch: str, input_size: int, batch_size: int, rows_per_file: int
) -> argparse.ArgumentParser:
    """The options of every labeling benchmark (the JPEG pool, the untrained teacher, the job's settings, the
    repeats), with its defaults, and the hidden ones that its measured phases are run with."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--source-size", type=int, default=source_size, help="side of the JPEG files, pixels")
    p.add_argument("--arch", default=arch, help="timm architecture of the untrained teacher")
    p.add_argument("--input-size", type=int, default=input_size)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=batch_size, help="teacher batch")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads of a model on the CPU")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of each local Ray cluster")
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=rows_per_file,
        help="rows per predictions file, each one commit (one per teacher batch dates every batch)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    return p


def labeling_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of ``labeling_arguments``, as a labeling benchmark reports them."""
    return {
        "images": args.images,
        "source": f"{args.source_size}x{args.source_size} JPEG (q90)",
        "model": args.arch,
        "input_size": args.input_size,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "ray_cpus": args.cpus,
        "rows_per_file": args.rows_per_file,
        "repeats": args.repeats,
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was when the run started."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def load() -> float:
    return round(os.getloadavg()[0], 2)


def median(values: list[float | None], digits: int | None = None) -> float | None:
    """The median of the figures that were measured (a run too short for a steady state has none), rounded to
    ``digits`` when given; None when none was."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    middle = float(statistics.median(known))
    return middle if digits is None else round(middle, digits)


def emit(result: dict[str, Any]) -> None:
    """The benchmark's result: one JSON document on stdout (phases print theirs as the last line)."""
    print(json.dumps(result, indent=2, default=float), flush=True)


@contextmanager
def ray_cluster(num_cpus: int = 2):
    """A private local Ray cluster (never attaches to another one on the machine) that has run a Ray Data job,
    shut down on exit."""
    import ray

    from service import cluster

    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="nstb-", dir="/tmp")
    os.environ.pop("RAY_ADDRESS", None)
    try:
        cluster.connect("local", num_cpus=num_cpus, temp_dir=temp_dir)
        # Ray Data's actors of a cluster (its stats and its resource coordinator: detached, started by the first
        # job that uses Ray Data and kept for every later one), started with the cluster, as a long-lived
        # cluster has them: a job measured here pays its own start-up, not the cluster's.
        ray.data.range(1).map_batches(lambda batch: batch).materialize()
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far: user and system) of a process, from /proc (Linux); None once it
    has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            tree.setdefault(stat[0], []).append(int(entry.name))
    return tree


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _name(pid: int) -> str:
    """A process's command line, shortened (Ray names its workers ``ray::<task or actor>``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return str(pid)
    first = os.path.basename(args[0].decode(errors="replace"))
    if first.startswith("ray::") or len(args) < 2:
        return first
    return f"{first} {os.path.basename(args[1].decode(errors='replace'))}"[:60]


def _memory_kib(pid: int, *, pss: bool) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB; PSS is 0 unless asked for."""
    rss = proportional = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        proportional = int(line.split()[1])
                        break
    except OSError:  # the process ended between the listing and the read
        pass
    return rss, proportional


class _TreeSampler:
    """Calls ``sample()`` in a thread, at once and every SAMPLE_SECONDS from ``start()``, and once more at
    ``stop()``; a context manager too."""

    def __init__(self, pid: int):
        self.pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_SECONDS):
                return


class TreeMemory(_TreeSampler):
    """Samples the summed memory of a process and all its descendants every SAMPLE_SECONDS, in a thread.

    ``rss`` double-counts pages that several processes share (the Ray object store is shared memory mapped
    into every worker that touches it); ``pss`` splits each shared page between the processes that map it,
    so it adds up to the memory actually used. Reading PSS is slow (about 10 ms per large process), so it is
    sampled every PSS_EVERY-th time only; RSS every time.
    """

    PSS_EVERY = 10

    def __init__(self, pid: int, *, pss: bool = True):
        super().__init__(pid)
        self.pss = pss
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self.at_peak: list[tuple[str, float]] = []  # (process, RSS MiB) at the peak of the summed RSS

    def sample(self) -> None:
        pids = tree_pids(self.pid)
        with_pss = self.pss and self.samples % self.PSS_EVERY == 0
        rss = pss = 0
        per_process = []
        for p in pids:
            r, q = _memory_kib(p, pss=with_pss)
            rss, pss = rss + r, pss + q
            per_process.append((r, p))
        self.samples += 1
        if rss * 1024 > self.peak_rss:
            self.peak_rss = rss * 1024
            self.at_peak = [(_name(p), round(r / 1024, 1)) for r, p in sorted(per_process, reverse=True)]
        self.peak_pss = max(self.peak_pss, pss * 1024)
        self.peak_processes = max(self.peak_processes, len(pids))

    def report(self) -> dict[str, Any]:
        out = {
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "samples": self.samples,
            "peak_processes": self.peak_processes,
        }
        if self.pss:
            out["peak_pss_mib"] = round(self.peak_pss / 2**20, 1)
        out["rss_mib_at_peak"] = [f"{name}: {mib}" for name, mib in self.at_peak]
        return out


class TreeCPU(_TreeSampler):
    """The CPU seconds (user and system) that a process and all its descendants use between ``start()`` and
    ``stop()``, by process, read from /proc every SAMPLE_SECONDS in a thread. A process that ends between two
    samples loses its last fraction of a sample; one that starts and ends between two is missed."""

    def __init__(self, pid: int | None = None):
        super().__init__(pid or os.getpid())
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, list[str]] = {}  # every name a process had: a Ray worker's follows its tasks
        self.wall = 0.0

    def start(self) -> Self:
        self.sample()
        self.first = dict(self.last)
        self._started = time.perf_counter()
        return super().start()

    def stop(self) -> None:
        super().stop()
        self.wall = time.perf_counter() - self._started

    def sample(self) -> None:
        for p in tree_pids(self.pid):
            stat = _stat(p)
            if stat is None:
                continue
            # A process's name is read again only when it has run since: a Ray worker's changes with its task.
            if self.last.get(p) != stat[1]:
                names, name = self.names.setdefault(p, []), _name(p) or f"pid {p}"
                if name not in names and (name != "ray::IDLE" or not names):
                    names.append(name)
            self.last[p] = stat[1]

    def _label(self, pid: int) -> str:
        """A Ray worker by the tasks it ran or its actor (``ray::TrainController``, not each method); any other
        process by its command."""
        ray_names = []
        for name in self.names[pid]:
            if name.startswith("ray::") and name != "ray::IDLE":
                name = name[: name.rindex(")") + 1] if ")" in name else name.split(".")[0]
                if name not in ray_names:
                    ray_names.append(name)
        return " + ".join(ray_names) or self.names[pid][0]

    def report(self, cpus: int, top: int = 8) -> dict[str, Any]:
        """CPU seconds in all, the share of ``cpus`` cores they took over the wall time, and the processes
        that used the most (a Ray worker by the names of the tasks it was seen running, or its actor's)."""
        used = sorted(((cpu - self.first.get(p, 0.0), p) for p, cpu in self.last.items()), reverse=True)
        total = sum(seconds for seconds, _ in used)
        return {
            "cpu_seconds": round(total, 1),
            "cpu_utilization": round(total / max(self.wall * cpus, 1e-9), 3),
            "cpu_seconds_by_process": [f"{self._label(p)}: {seconds:.1f}" for seconds, p in used[:top]],
        }


def run_phase(script: str, args: list[str], *, memory: bool = False, timeout: float = 900) -> dict[str, Any]:
    """Run ``python <script> --phase ...`` in a child process; return the JSON it prints last, with the peak
    memory of its process tree under ``memory`` when asked."""
    cmd = [sys.executable, script, *args]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(proc.pid).start() if memory else None
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if sampler:
            sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed no result:\n{out[-2000:]}\n{err[-2000:]}")
    result = json.loads(lines[-1])
    result["process_seconds"] = round(time.time() - started, 2)
    if sampler:
        result["memory"] = sampler.report()
    return result


def interleaved(
    script: str, ways: list[str], common: list[str], repeats: int, show: tuple[str, ...] = ("steady", "end_to_end")
) -> tuple[dict[str, list[dict]], list[float]]:
    """Each way run ``repeats`` times in its own process (``--phase <way>``), A B C then C B A, so that each sees
    the machine's drift from both sides; the runs of each way (each with its ``load_average_before``), and the
    load averages in the order of the runs. Each run's ``show`` figures go to stderr as it ends."""
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    loads = []
    for r in range(repeats):
        for way in ways if r % 2 == 0 else ways[::-1]:
            loads.append(load())
            result = run_phase(script, ["--phase", way, *common])
            result["load_average_before"] = loads[-1]
            runs[way].append(result)
            figures = ", ".join(f"{k} {result.get(k) or 0:.1f}" for k in show)
            print(f"repeat {r + 1} {way}: {figures} (load {loads[-1]})", file=sys.stderr, flush=True)
    return runs, loads


def ratio(runs: dict[str, list[dict]], way: str, base: str, key: str) -> dict[str, Any]:
    """``way`` over ``base`` on ``key`` in each repeat (two runs made next to each other), and the median of
    those: not the ratio of the medians, which pairs figures from different moments of a drifting machine."""
    per_repeat = [
        round(a[key] / b[key], 3) if a[key] is not None and b[key] else None
        for a, b in zip(runs[way], runs[base], strict=True)
    ]
    return {"median": median(per_repeat, 3), "per_repeat": per_repeat}


def phase_result(result: dict[str, Any]) -> None:
    """What a phase hands back to its parent: one JSON line on stdout."""
    print(json.dumps(result, default=float), flush=True)


def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A JPEG that compresses and decodes like a photo: smooth structure plus fine grain (pure noise would be
    several times larger and slower to decode than a photo; a flat image, much smaller and faster)."""
    from PIL import Image

    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_jpegs(job: tuple[str, int, int, int, int, int]) -> list[str]:
    folder, start, stop, width, height, seed = job
    rng = np.random.default_rng([seed, start])
    paths = []
    for i in range(start, stop):
        path = os.path.join(folder, f"{i // 1000:04d}", f"img{i:07d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(photo_jpeg(rng, width, height))
        paths.append(path)
    return paths


def jpeg_pool(name: str, count: int, width: int, height: int, *, seed: int = 0) -> list[str]:
    """``count`` photo-like JPEGs under DATA_DIR/name (made once; a pool of at least as many with the same
    parameters is reused)."""
    folder = DATA_DIR / name
    stamp = folder / "pool.json"
    params = {"count": count, "width": width, "height": height, "seed": seed}
    if stamp.exists():
        made = json.loads(stamp.read_text())
        if made["count"] >= count and {**made, "count": count} == params:
            return json.loads((folder / "paths.json").read_text())[:count]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    from concurrent.futures import ProcessPoolExecutor

    step = 2000
    jobs = [(str(folder), a, min(a + step, count), width, height, seed) for a in range(0, count, step)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        paths = [p for part in pool.map(_write_jpegs, jobs) for p in part]
    (folder / "paths.json").write_text(json.dumps(paths))
    stamp.write_text(json.dumps(params))
    return paths


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, bytes) members, in order: a WebDataset shard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def manifest(paths: list[str], uri: str) -> str:
    """An unlabeled-source manifest (image_id, uri), written as ``nstudent index`` writes one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation import sources

    table = pa.table(
        {"image_id": pa.array(sources.image_ids(paths)), "uri": pa.array(paths, pa.string())},
        schema=sources.UNLABELED_SCHEMA,
    )
    pq.write_table(table, uri, row_group_size=sources.INDEX_ROW_GROUP_ROWS)
    return uri
