"""``zeropur-rt serve`` (a model repository and a loopback tritonserver in one command) and ``zeropur-rt query``
(send images to a served purifier, print the labels)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SERVE_HELP = ("write a Triton model repository for an artifact and run tritonserver on loopback: the one on PATH "
              "($ZEROPUR_TRITONSERVER, /opt/tritonserver) or the bundled one, fetched once")
QUERY_HELP = "send images to a served purifier over HTTP and print each image's label"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", default=None, help="model repository to write (default: a temporary folder, removed "
                   "at exit)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (0: any free port)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: at Ctrl-C)")


def run_serve(args: argparse.Namespace, options: object) -> int:
    """Repository, server, endpoints and a client line; serves until Ctrl-C (or --seconds)."""
    from zeropur_rt.serving.repository import write_repository
    from zeropur_rt.serving.server import TritonServer, find_triton

    install = find_triton()  # before any writing: a missing server is the likelier failure
    with tempfile.TemporaryDirectory(prefix="zeropur-repo-") as tmp:
        repo = write_repository(args.artifact_dir, args.repo or Path(tmp) / "repo", options, force=args.force)
        ports = {"http": args.http_port, "grpc": args.grpc_port}
        print(f"model repository {repo}; starting {install.binary} ...", flush=True)
        with TritonServer(repo, install, ports=ports, log_path=Path(tmp) / "tritonserver.log") as server:
            name = getattr(options, "name", "zeropur")
            print(f"serving {name} on HTTP {server.http} and gRPC {server.grpc} (loopback only)\n"
                  f"  try: zeropur-rt query http://{server.http} images/ --model {name}\n"
                  f"  server log: {server.log_path}; Ctrl-C stops it", flush=True)
            try:
                deadline = None if args.seconds is None else time.monotonic() + args.seconds
                while server.alive() and (deadline is None or time.monotonic() < deadline):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            if not server.alive() and server.proc is not None and server.proc.poll() is not None:
                print(server.log()[-2000:], file=sys.stderr)
                return 1
    print("stopped")
    return 0


def add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server's HTTP endpoint, e.g. http://127.0.0.1:8000")
    p.add_argument("input", help="one image file, a folder of images (flat or one subfolder per class), an .npz or "
                   "a path,label CSV")
    p.add_argument("--model", default="zeropur", help="served model name (zeropur: purify then classify; "
                   "zeropur_classify: the bare classifier, if the repository has it)")
    p.add_argument("--batch", type=int, default=8, help="images per request")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to this long for the model to be ready (a server that is still starting)")
    p.add_argument("--resize", choices=["crop", "refuse"], default="refuse",
                   help="images of another size: refuse them (default), or scale to cover + centre crop")


def run_query(args: argparse.Namespace) -> int:
    """Each image's label from the served model; the accuracy where the input is labelled."""
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise ImportError("zeropur-rt query needs tritonclient: pip install 'zeropur-rt[serve]'") from None
    from zeropur_rt.datasets import read_dataset

    if args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    url = args.url.removeprefix("http://").rstrip("/")
    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            meta = client.get_model_metadata(args.model)
            break
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own exception type, or socket errors
            if time.monotonic() >= deadline:
                raise OSError(f"cannot reach model {args.model!r} at {args.url}: {e}"
                              + ("" if args.wait else " (--wait SECONDS waits for a server that is starting)")) from None
            time.sleep(1)
    dims = next(i["shape"] for i in meta["inputs"] if i["name"] == "IMAGE")
    images = read_dataset(args.input, [int(d) for d in dims[1:]], resize=args.resize, labels=False)
    x, y, names = images.x, images.y, images.names
    labels = []
    for i in range(0, len(x), args.batch):
        inp = httpclient.InferInput("IMAGE", list(x[i:i + args.batch].shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x[i:i + args.batch]))
        labels.append(client.infer(args.model, [inp]).as_numpy("LABEL")[:, 0])
    pred = np.concatenate(labels)
    for n, p in zip(names, pred):
        print(f"{n}\t{int(p)}")
    if y is not None:
        print(f"accuracy: {100 * float((pred == y).mean()):.2f}% of {len(y)} images")
    return 0
