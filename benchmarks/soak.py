"""Soak test of the service's memory: mixed good and bad traffic for minutes, the worker's RSS every 10 s, then idle.

Starts a real `bentoml serve` (project root) on 127.0.0.1 per arm, all arms at once so that they share the
machine's load, drives each with N clients for ``--duration`` seconds, idles ``--idle`` seconds, and prints per
arm: the worker's RSS (VmRSS of /proc/PID/status of each `bentoml serve` worker, summed) before any request, at
the end of the warm-up and of the traffic (the lowest sample of the last half warm-up before each: what stays
between requests, not a batch in flight) and after the idle time; growth after the warm-up; after-idle against
the start; the answers per kind of request; PASS/FAIL against issue 21's targets.

    python benchmarks/soak.py                                   # 8 clients, 600 s, 60 s idle, 128x128 model
    python benchmarks/soak.py --duration 120 --warmup 30 --idle 30 --plot soak.png
    python benchmarks/soak.py --arm as-is: --arm release:RELEASE=10 --arm trim:TRIM=10

An arm is LABEL:NAME=VALUE,...: settings added to the served process's environment. RELEASE=S, TRIM=S and
ORT_ARENA=0 are no settings of the service: they change its worker from outside (WORKER_SETTINGS), to measure
a fix before the service has it.

Traffic, in turn: photos smaller than the model input and photos of several tiles on /segment, /segment_batch
of both; corrupt bytes, an image over the tile limit, a decompression-bomb header, a /segment_batch of 16
copies of a 16-bit 4096x2048 PNG, a progressive JPEG of 10,000 scans, truncated PNG and JPEG files, an upload
dropped halfway through its body.

Targets (issue 21): over a 10-minute soak the worker's RSS grows < 10 % after the warm-up, and 60 s after the
traffic stops it is within 10 % of its start.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the sibling benchmarks

from benchmarks.decode_bombs import scan_bomb, sixteen_bit_png  # noqa: E402
from benchmarks.serve_load import Sample, drive, export_default_model, format_counts, parse_size, probe_cycle, \
    server_env  # noqa: E402
from benchmarks.serve_traffic import (BAD, CONN_ERROR, GOOD, TIMEOUT, Probe, Status,  # noqa: E402
                                      dropped_upload_probe, interleave, png_claiming, synthetic_photo, tile_count,
                                      upload_probe)
from serving.launch import free_port, start_server, stop_server  # noqa: E402

GROWTH_TARGET = 0.10  # RSS at the end of the traffic over RSS after the warm-up, minus 1
IDLE_TARGET = 0.10  # |RSS after the idle time over RSS at the start, minus 1|
WORKER_MODULE = "_bentoml_impl.worker.service"  # what a `bentoml serve` worker runs (python -m ...)
# Arm settings that are no environment variable of the service: each changes the worker through a
# sitecustomize module on its PYTHONPATH, to measure a fix without editing the service.
#   RELEASE=S     serving.memory.start_release_thread(S): release_memory() (gc.collect + malloc_trim) every S s
#   TRIM=S        malloc_trim alone every S s (release_memory(collect=False)), to tell the two causes apart
#   ORT_ARENA=0   ONNX Runtime sessions without the CPU memory arena (enable_cpu_mem_arena=False)
WORKER_SETTINGS = ("RELEASE", "TRIM", "ORT_ARENA")
SITECUSTOMIZE = """\
import os, sys
if "_bentoml_impl.worker.service" in sys.orig_argv:
    if os.environ.get("AGMM_SOAK_ORT_ARENA") == "0":
        from agmm_deploy.runtime import ort
        make_options = ort.cpu_session_options
        def cpu_session_options(*args, **kwargs):
            options = make_options(*args, **kwargs)
            options.enable_cpu_mem_arena = False
            return options
        ort.cpu_session_options = cpu_session_options
    if os.environ.get("AGMM_SOAK_RELEASE"):
        from serving.memory import start_release_thread
        start_release_thread(float(os.environ["AGMM_SOAK_RELEASE"]))
    elif os.environ.get("AGMM_SOAK_TRIM"):
        import threading, time
        from serving.memory import release_memory
        def trim_forever():
            while True:
                time.sleep(float(os.environ["AGMM_SOAK_TRIM"]))
                release_memory(collect=False)
        threading.Thread(target=trim_forever, daemon=True).start()
"""


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """'tuned:MALLOC_ARENA_MAX=1,MALLOC_MMAP_THRESHOLD_=262144' -> ('tuned', {...}); 'as-is:' -> ('as-is', {})."""
    label, _, settings = text.partition(":")
    env = {}
    for item in filter(None, settings.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--arm {text!r}: expected LABEL:NAME=VALUE,... (e.g. "
                                             "tuned:MALLOC_MMAP_THRESHOLD_=262144, or as-is: for none)")
        env[name] = value
    if not label:
        raise argparse.ArgumentTypeError(f"--arm {text!r} has no label; expected LABEL:NAME=VALUE,...")
    return label, env


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="model to serve; default: a randomly initialised ResNet-18 "
                        "DeepLabV3+ exported at --size to a temporary folder")
    parser.add_argument("--size", type=parse_size, default=(128, 128), help="input of the exported model")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients per arm")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, default=60.0, help="the first seconds of traffic; growth is "
                        "measured from the RSS sampled when they end")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds without traffic after it")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between two RSS samples")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for an answer")
    parser.add_argument("--arm", type=parse_arm, action="append", metavar="LABEL:NAME=VALUE,...",
                        help="a server with these settings added to its environment, served at the same time as "
                        "the other arms (repeatable; default: one arm, as-is)")
    parser.add_argument("--plot", type=Path, help="write a PNG of each arm's worker RSS over time")
    return parser


# ---------------------------------------------------------------------------------------------- traffic


def batch_probe(kind: str, expect: str, images: list[bytes]) -> Probe:
    """A POST of {"images": [base64, ...]} to /segment_batch; the status says how many images were refused."""
    body = json.dumps({"images": [base64.b64encode(image).decode("ascii") for image in images]}).encode()

    def send(url: str, session: requests.Session, timeout: float) -> tuple[Status, int]:
        try:
            response = session.post(f"{url}/segment_batch", data=body, timeout=timeout,
                                    headers={"Content-Type": "application/json"})
        except requests.Timeout:
            return TIMEOUT, 0
        except requests.RequestException:
            return CONN_ERROR, 0
        if response.status_code != 200:
            return response.status_code, 0
        refused = sum(item.get("error") is not None for item in response.json())
        return (200 if not refused else f"200, {refused}/{len(images)} refused"), 0

    return Probe(kind, expect, send)


def soak_probes(input_hw: tuple[int, int], max_inputs: int) -> list[Probe]:
    """One round of the soak's traffic: two good requests for each bad one, interleaved."""
    th, tw = input_hw
    small = synthetic_photo(max(16, tw * 3 // 4), max(16, th * 3 // 4), seed=1)
    # As many tiles as the limit allows, up to 4x4 inputs: the large buffers of tiled work.
    side = 4
    while side > 1 and tile_count(side * tw, side * th, input_hw) > max_inputs:
        side -= 1
    large = synthetic_photo(side * tw, side * th, seed=2)
    png = synthetic_photo(tw, th, seed=3, fmt="PNG")
    over = next(n for n in range(side, 64) if tile_count(n * tw, n * th, input_hw) > max_inputs)
    good = [
        upload_probe(f"small {tw * 3 // 4}x{th * 3 // 4}", GOOD, small),
        upload_probe(f"large {side * tw}x{side * th}", GOOD, large),
        batch_probe("batch: 2 small + 2 large", GOOD, [small, large, small, large]),
        upload_probe("png", GOOD, png, "image.png"),
    ]
    bad = [
        upload_probe("corrupt bytes", BAD, os.urandom(20_000)),
        upload_probe(f"over tile limit {over * tw}x{over * th}", BAD, synthetic_photo(over * tw, over * th, seed=4)),
        upload_probe("bomb header 30000x30000", BAD, png_claiming(30_000, 30_000), "bomb.png"),
        batch_probe("batch: 16 x 16-bit 4096x2048 png", BAD, [sixteen_bit_png()] * 16),
        upload_probe("progressive jpeg, 10000 scans", BAD, scan_bomb(10_000)),
        upload_probe("truncated png", BAD, png[:len(png) // 2], "image.png"),
        upload_probe("truncated jpeg", BAD, large[:len(large) // 2]),
        dropped_upload_probe(small),
    ]
    return interleave([good * 4, bad])


# ---------------------------------------------------------------------------------------------- memory


def worker_pids(server_pid: int) -> list[int]:
    """The `bentoml serve` workers (processes running the service) among the server's descendants."""
    pids = []
    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            if WORKER_MODULE in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def proc_status(pid: int, *keys: str) -> dict[str, int]:
    """Fields of /proc/PID/status in bytes (e.g. VmRSS, RssAnon); 0 for a process that is gone."""
    values = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return values


def worker_env(pid: int, prefix: str = "MALLOC_") -> dict[str, str]:
    """The worker's environment variables starting with ``prefix`` (what glibc read when it started)."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if item.startswith(prefix.encode()))


# ---------------------------------------------------------------------------------------------- one arm


@dataclass
class Arm:
    """One server under soak: its settings, its process, and what was measured."""

    label: str
    env: dict[str, str]
    url: str = ""
    process: object = None
    workers: list[int] = field(default_factory=list)
    malloc_env: dict[str, str] = field(default_factory=dict)
    trace: list[tuple[float, int, int]] = field(default_factory=list)  # (s since traffic began, VmRSS, RssAnon)
    samples: list[Sample] = field(default_factory=list)

    def floor(self, first: float, last: float) -> int:
        """The lowest VmRSS sampled between ``first`` and ``last`` seconds (what stays between requests: a batch
        in flight when one sample is taken is not memory kept)."""
        return min([rss for t, rss, _ in self.trace if first - 0.5 <= t <= last + 0.5] or [self.trace[0][1]])


def start_arm(label: str, env: dict[str, str], model: Path, folder: Path) -> Arm:
    folder.mkdir(parents=True)
    served = server_env(model, device="cpu", max_batch_size=8, max_latency_ms=20_000)
    served["BENTOML_HOME"] = str(folder / "bentoml")
    settings = dict(env)
    if worker := {name: settings.pop(name) for name in WORKER_SETTINGS if name in settings}:
        (folder / "site").mkdir()
        (folder / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        served.update({f"AGMM_SOAK_{name}": value for name, value in worker.items()})
        served["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder / "site"), served.get("PYTHONPATH")]))
    served.update(settings)
    arm = Arm(label, env)
    port = free_port()
    arm.process = start_server(port, folder / "serve.log", served)
    arm.url = f"http://127.0.0.1:{port}"
    arm.workers = worker_pids(arm.process.pid)
    arm.malloc_env = worker_env(arm.workers[0]) if arm.workers else {}
    return arm


def sample_rss(arms: list[Arm], interval: float, clock_zero: float, stop: threading.Event) -> None:
    """Appends each arm's worker RSS to its trace every ``interval`` s until ``stop`` is set."""
    next_at = clock_zero
    while not stop.is_set():
        now = time.perf_counter()
        for arm in arms:
            fields = [proc_status(pid, "VmRSS", "RssAnon") for pid in arm.workers]
            arm.trace.append((now - clock_zero, sum(f["VmRSS"] for f in fields), sum(f["RssAnon"] for f in fields)))
        next_at += interval
        stop.wait(max(0.0, next_at - time.perf_counter()))


def run_soak(args: argparse.Namespace, model: Path, folder: Path) -> list[Arm]:
    arms = []
    try:
        for i, (label, env) in enumerate(args.arm or [("as-is", {})]):
            print(f"starting arm {label!r} {env or ''} ...", flush=True)
            arms.append(start_arm(label, env, model, folder / f"arm{i}"))
        info = requests.post(f"{arms[0].url}/info", timeout=30).json()
        probes = soak_probes(tuple(info["input_size"]), int(info.get("max_inputs") or 32))
        stop, clock_zero = threading.Event(), time.perf_counter()
        sampler = threading.Thread(target=sample_rss, args=(arms, args.interval, clock_zero, stop))
        sampler.start()
        with ThreadPoolExecutor(len(arms)) as pool:
            runs = [pool.submit(drive, arm.url, probe_cycle(probes), args.clients, args.duration, f"soak {arm.label}",
                                arm.process.pid, timeout=args.timeout, clock_zero=clock_zero) for arm in arms]
            for arm, run in zip(arms, runs):
                arm.samples = run.result()[0]
        traffic_end = time.perf_counter() - clock_zero
        print(f"traffic over after {traffic_end:.0f} s; idle {args.idle:.0f} s ...", flush=True)
        time.sleep(args.idle)
        stop.set()
        sampler.join()
        args.traffic_end = traffic_end
        return arms
    finally:
        for arm in arms:
            stop_server(arm.process)


# ---------------------------------------------------------------------------------------------- the report


def print_report(arms: list[Arm], args: argparse.Namespace) -> bool:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\nsoak: {len(arms)} arm(s) at once, {args.clients} clients each, {args.duration:.0f} s of traffic "
          f"(warm-up {args.warmup:.0f} s), {args.idle:.0f} s idle, RSS every {args.interval:.0f} s; {cpu}, "
          f"{psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    mib = 2 ** 20
    passed_all = True
    # warm and end: the floor of the warm-up's last half against that of the traffic's last stretch as long;
    # start and idle: single samples, before any request and after the idle time.
    window = max(args.warmup / 2, args.interval)
    print(f"{'arm':<12}{'start':>8}{'warm':>8}{'end':>8}{'idle':>8}{'peak':>8}{'growth':>9}{'idle/start':>12}"
          f"{'200/s':>7}  result   (worker VmRSS, MiB)")
    for arm in arms:
        start, idle, peak = arm.trace[0][1], arm.trace[-1][1], max(rss for _, rss, _ in arm.trace)
        warm = arm.floor(args.warmup - window, args.warmup)
        end = arm.floor(args.traffic_end - window, args.traffic_end)
        growth, back = end / warm - 1, idle / start - 1
        answered = sum(s.status == 200 for s in arm.samples)
        passed = growth < GROWTH_TARGET and abs(back) <= IDLE_TARGET
        passed_all &= passed
        print(f"{arm.label:<12}{start / mib:>8.0f}{warm / mib:>8.0f}{end / mib:>8.0f}{idle / mib:>8.0f}"
              f"{peak / mib:>8.0f}{growth:>+9.1%}{back:>+12.1%}{answered / args.traffic_end:>7.2f}  "
              f"{'PASS' if passed else 'FAIL'}")
    print(f"warm, end: the lowest sample of the last {window:.0f} s of the warm-up and of the traffic; start: before "
          "any request;\nidle: the last sample; 200/s: answers 200 per second of traffic (a batch counts once)")
    print(f"targets: growth after warm-up < {GROWTH_TARGET:.0%}; after {args.idle:.0f} s idle within "
          f"{IDLE_TARGET:.0%} of the start")
    for arm in arms:
        print(f"\narm {arm.label}: settings {arm.env or 'none'}; worker(s) {arm.workers}, glibc environment "
              f"{arm.malloc_env or 'none'}")
        print("  VmRSS every %.0f s (MiB): %s" % (args.interval, " ".join(f"{r / mib:.0f}" for _, r, _ in arm.trace)))
        print("  RssAnon               : " + " ".join(f"{a / mib:.0f}" for _, _, a in arm.trace))
        by_kind: dict[str, Counter] = {}
        for sample in arm.samples:
            by_kind.setdefault(sample.kind, Counter())[sample.status] += 1
        for kind, counts in by_kind.items():
            print(f"  {kind:<36} {format_counts(counts)}")
        print(f"  all: {format_counts(Counter(s.status for s in arm.samples))}")
    return passed_all


def plot_rss(arms: list[Arm], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5))
    for arm in arms:
        axes.plot([t for t, _, _ in arm.trace], [r / 2 ** 20 for _, r, _ in arm.trace], marker=".", label=arm.label)
    axes.axvline(args.warmup, color="grey", linestyle=":", label="end of warm-up")
    axes.axvline(args.traffic_end, color="grey", linestyle="--", label="traffic stops")
    axes.set_xlabel("seconds since the traffic began")
    axes.set_ylabel("worker VmRSS (MiB)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> bool:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        tmp = Path(tmp)
        model = args.model or export_default_model(args.size, tmp)
        arms = run_soak(args, model, tmp)
    passed = print_report(arms, args)
    if args.plot:
        plot_rss(arms, args)
        print(f"\nRSS over time: {args.plot}")
    return passed


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
