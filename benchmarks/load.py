"""Load benchmark of the Triton model repository on a real tritonserver, loopback only.

    python -m benchmarks.load ARTIFACT_DIR --out bench/load [--set gs_steps=5 ap_steps=50] \
        [--concurrency 1 2 4 8 16] [--rates 2 4 8 ...] [--requests 200] [--max-seconds 60]

For each serving mode (``dynamic``: Triton's dynamic batcher over whole loops; ``single``: dynamic batching
off; ``continuous``: the decoupled model, images join and leave the running batch at each loop step) it
starts tritonserver on free 127.0.0.1 ports and runs

* closed loop: C clients, each sends its next request when the last one is answered (C = --concurrency);
* open loop: Poisson arrivals at each rate of --rates (default: fractions of the best closed-loop
  throughput, up to 1.25x of it: past saturation).

Every run is bounded by --requests and --max-seconds (arrivals stop at whichever comes first), then waits
at most --drain-seconds for the answers. Each request is answered, refused with an error, or counted as
lost; the report states lost explicitly. Throughput = answered images / wall time from the first send to
the last answer; latency per request; mean formed batch = Triton's inference_count / execution_count
(statistics endpoint, the model's own counters over the run; the continuous model executes each request
on arrival, so there the scheduler's batch is not visible to Triton and the column is empty).

Writes load.json, load.md and load.png (latency against throughput) into --out. Timings on a shared CPU
are upper bounds.
"""
from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeropur_rt.config import parse_sets
from zeropur_rt.files import atomic_write_bytes, atomic_write_json, atomic_write_text

MODES = ("dynamic", "single", "continuous")


@dataclass
class Run:
    mode: str
    loop: str  # closed | open
    level: float  # concurrency, or offered requests/s
    sent: int
    answered: int
    refused: int
    lost: int
    seconds: float
    throughput: float  # answered images / s
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float | None


class Client:
    """gRPC sends with a completion callback: unary for the batched models, one stream for the decoupled one."""

    def __init__(self, url: str, model: str, streaming: bool):
        import tritonclient.grpc as grpc
        self.grpc, self.model, self.streaming = grpc, model, streaming
        self.client = grpc.InferenceServerClient(url)
        self.waiting: dict[str, Callable[[Any, Any], None]] = {}
        self.lock = threading.Lock()
        if streaming:
            self.client.start_stream(callback=self._on_stream)

    def _on_stream(self, result: Any, error: Any) -> None:
        rid = result.get_response().id if result is not None else getattr(error, "request_id", lambda: None)()
        with self.lock:
            cb = self.waiting.pop(rid, None) if rid else None
            if cb is None and error is not None and len(self.waiting) == 1:  # an error without its id
                cb = self.waiting.pop(next(iter(self.waiting)))
        if cb:
            cb(result, error)

    def send(self, rid: str, x: np.ndarray, done: Callable[[Any, Any], None]) -> None:
        inp = self.grpc.InferInput("IMAGE", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outs = [self.grpc.InferRequestedOutput("LABEL")]
        if self.streaming:
            with self.lock:
                self.waiting[rid] = done
            self.client.async_stream_infer(self.model, [inp], request_id=rid, outputs=outs)
        else:
            self.client.async_infer(self.model, [inp], callback=lambda result, error: done(result, error),
                                    request_id=rid, outputs=outs)

    def close(self) -> None:
        if self.streaming:
            self.client.stop_stream()
        self.client.close()


def _stats(server: Any, model: str) -> tuple[int, int]:
    s = server.statistics(model)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def run_load(server: Any, model: str, mode: str, loop: str, level: float, x: np.ndarray, per_request: int,
             requests: int, max_seconds: float, drain_seconds: float, seed: int = 0) -> Run:
    """One bounded run against a started ``TritonServer``; see the module docstring."""
    client = Client(server.grpc, model, streaming=(mode == "continuous"))
    latencies: list[float] = []
    outcome: queue.Queue = queue.Queue()
    lock = threading.Lock()
    sent = [0]
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    stop_at = t_start + max_seconds

    def fire() -> bool:
        with lock:
            if sent[0] >= requests or time.perf_counter() >= stop_at:
                return False
            k = sent[0]
            sent[0] += 1
        i = (k * per_request) % (len(x) - per_request + 1)
        t0 = time.perf_counter()

        def done(result: Any, error: Any) -> None:
            t1 = time.perf_counter()
            if error is None:
                latencies.append(t1 - t0)
            outcome.put((error is None, t1))
            if loop == "closed":
                fire()
        client.send(str(k), x[i:i + per_request], done)
        return True

    before = _stats(server, model)
    if loop == "closed":
        for _ in range(int(level)):
            fire()
    else:
        t_next = t_start
        while True:
            t_next += rng.exponential(1.0 / level)
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not fire():
                break
    answered = refused = 0
    t_last = t_start
    deadline = None
    while answered + refused < sent[0]:
        if deadline is None and (sent[0] >= requests or time.perf_counter() >= stop_at):
            deadline = time.perf_counter() + drain_seconds  # arrivals are over: the answers get drain_seconds
        try:
            ok, t1 = outcome.get(timeout=0.5)
        except queue.Empty:
            if deadline is not None and time.perf_counter() > deadline:
                break
            continue
        answered, refused, t_last = answered + ok, refused + (not ok), max(t_last, t1)
    client.close()
    after = _stats(server, model)
    secs = max(t_last - t_start, 1e-9)
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    d_inf, d_exec = after[0] - before[0], after[1] - before[1]
    return Run(mode, loop, level, sent[0], answered, refused, sent[0] - answered - refused, secs,
               answered * per_request / secs, *(float(np.percentile(lat, q)) for q in (50, 90, 99)),
               (d_inf / d_exec) if d_exec and mode != "continuous" else None)


def write_report(runs: list[Run], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "load.json", {"meta": meta, "runs": [asdict(r) for r in runs]})
    head = ("| mode | loop | concurrency / offered req/s | sent | answered | refused | lost | images/s | "
            "p50 ms | p90 ms | p99 ms | mean formed batch |")
    rows = [head, "|" + "---|" * 12]
    for r in runs:
        mb = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        rows.append(f"| {r.mode} | {r.loop} | {r.level:g} | {r.sent} | {r.answered} | {r.refused} | {r.lost} | "
                    f"{r.throughput:.2f} | {r.p50_ms:.0f} | {r.p90_ms:.0f} | {r.p99_ms:.0f} | {mb} |")
    lost = sum(r.lost for r in runs)
    text = "\n".join(rows) + f"\n\nlost = {lost} over {sum(r.sent for r in runs)} requests. {meta.get('note', '')}\n"
    atomic_write_text(out / "load.md", text)
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, loop in zip(axes, ("closed", "open")):
        for mode in MODES:
            rs = sorted((r for r in runs if r.mode == mode and r.loop == loop and r.answered), key=lambda r: r.level)
            if rs:
                ax.plot([r.throughput for r in rs], [r.p50_ms for r in rs], "o-", label=f"{mode} p50")
                ax.plot([r.throughput for r in rs], [r.p99_ms for r in rs], "x--", label=f"{mode} p99")
        ax.set_title(f"{loop} loop")
        ax.set_xlabel("throughput (images/s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "load.png", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact_dir")
    ap.add_argument("--out", default="bench/load")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rates", type=float, nargs="+", default=None, help="offered requests/s (default: from closed loop)")
    ap.add_argument("--rate-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9, 1.0, 1.25])
    ap.add_argument("--requests", type=int, default=200, help="per run")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per run (arrivals stop)")
    ap.add_argument("--drain-seconds", type=float, default=60.0)
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    import os
    import tempfile

    from zeropur_export.data import load_cifar10_test, to_nchw_float
    from zeropur_rt.serving.repository import RepoOptions, write_repository
    from zeropur_rt.serving.server import TritonServer, find_triton
    install = find_triton()
    x = to_nchw_float(load_cifar10_test(stop=256)[0])
    cpus = os.cpu_count() or 1
    runs: list[Run] = []
    overrides = parse_sets(args.set)
    saturation: float | None = None
    with tempfile.TemporaryDirectory(prefix="zeropur-load-") as tmp:
        for mode in args.modes:
            # the same cores in every mode: one instance with every thread (a second instance would only
            # split them); dynamic batching on or off is the one difference between dynamic and single
            o = RepoOptions(instances=1, threads=args.threads or cpus, max_queue_delay_us=args.max_queue_delay_us,
                            dynamic_batching=(mode != "single"), continuous_model=(mode == "continuous"),
                            overrides=overrides)
            repo = write_repository(args.artifact_dir, Path(tmp) / mode, o)
            model = "zeropur_continuous" if mode == "continuous" else "zeropur"
            with TritonServer(repo, install) as server:
                run_load(server, model, mode, "closed", 1, x, args.images_per_request, 3, 60, 60)  # warm-up
                for c in args.concurrency:
                    r = run_load(server, model, mode, "closed", c, x, args.images_per_request, args.requests,
                                 args.max_seconds, args.drain_seconds)
                    runs.append(r)
                    print(r, flush=True)
                if args.rates is None and saturation is None:  # one rate grid for every mode: equal loads
                    saturation = max(r.throughput for r in runs) / args.images_per_request
                rates = args.rates or [round(f * saturation, 2) for f in args.rate_fractions]
                for rate in rates:
                    r = run_load(server, model, mode, "open", rate, x, args.images_per_request, args.requests,
                                 args.max_seconds, args.drain_seconds)
                    runs.append(r)
                    print(r, flush=True)
    meta = {"artifact": str(args.artifact_dir), "overrides": overrides, "cpus": cpus, "argv": argv,
            "note": "Loopback, one tritonserver per mode, one instance with every core."}
    write_report(runs, Path(args.out), meta)
    print((Path(args.out) / "load.md").read_text())
    return 0 if all(r.lost == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
