#!/usr/bin/env bash
# A stranger's first hour, timed: a fresh clone with no ../shared whose only route out is ZEROPUR_MIRROR, a
# loopback server holding the real weights and a CIFAR-10 archive in the official format made from the shared
# copy (the sources table pointed at its hash). Then the README: fetch, the first table, a deploy-only venv that
# purifies a PNG folder, serve + query. Usage: bash benchmarks/fresh_clone.sh [SHARED] [NEW_WORKDIR]  (about 15 min)
set -euo pipefail
T0=$(date +%s); stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
SHARED=$(realpath "${1:-../shared}"); REPO=$(git rev-parse --show-toplevel)
# A new folder ($TMPDIR's by default): never an existing one, so nothing of the user's is removed or reused
W=${2:-$(mktemp -d -t zeropur-stranger.XXXXXX)}
if [ -e "$W" ] && [ -n "$(ls -A "$W")" ]; then echo "$W is not empty: name a new folder" >&2; exit 2; fi
mkdir -p "$W/mirror"
export SHARED W
cp "$SHARED"/models/*.th "$W/mirror/"
python3 - <<'PY'
import hashlib, io, json, pickle, tarfile, numpy as np
import os
with np.load(os.environ["SHARED"] + "/data/cifar10_test.npz") as z: x, y = z["x"], z["y"]
batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y],
         b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072),
         b"filenames": [b"%05d.png" % i for i in range(len(x))]}
p = os.environ["W"] + "/mirror/cifar-10-python.tar.gz"
with tarfile.open(p, "w:gz") as tar:
    raw = pickle.dumps(batch, protocol=2); info = tarfile.TarInfo("cifar-10-batches-py/test_batch"); info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))
data = open(p, "rb").read()
json.dump({"cifar10": {"kind": "cifar10-archive", "file": "cifar-10-python.tar.gz", "size": len(data),
           "sha256": hashlib.sha256(data).hexdigest(), "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}},
          open(os.environ["W"] + "/sources.json", "w"))
PY
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 $PORT --directory $W/mirror >/dev/null 2>&1 & MIRROR=$!
trap 'kill $MIRROR 2>/dev/null || true' EXIT
export ZEROPUR_MIRROR=http://127.0.0.1:$PORT ZEROPUR_SOURCES=$W/sources.json ZEROPUR_CACHE=$W/cache \
       ZEROPUR_TRITON_CACHE=$W/triton OMP_WAIT_POLICY=PASSIVE
stamp "mirror up; clone"
git clone -q "$REPO" $W/zeropur-rt && cd $W/zeropur-rt
test ! -e ../shared
T1=$(date +%s)
python3 -m venv .venv && . .venv/bin/activate
pip install -q -e ".[export,dev]"; stamp "build install done"
zeropur-export demo --model resnet20 --n 4 2>&1 | tail -2 || true   # before fetch: the error a stranger meets
zeropur-export fetch; stamp "fetch done"
zeropur-export demo --model resnet20 --n 64 | tee $W/first_table.txt; stamp "FIRST TABLE (clone -> table: $(( $(date +%s) - T1 )) s)"
zeropur-export export resnet20 --out artifacts/resnet20
zeropur-export fetch --data-only --pngs images --n 16; stamp "artifact + PNGs"
deactivate
python3 -m venv deploy && . deploy/bin/activate
pip install -q ".[deploy,serve]"; stamp "deploy install done"
python -c "import torch" 2>/dev/null && { echo "torch in the deploy venv!"; exit 1; } || echo "deploy venv: no torch"
zeropur-export demo --model resnet20 2>&1 | tail -1 || true
zeropur-rt info artifacts/resnet20
zeropur-rt purify artifacts/resnet20 images --out purified; ls purified | head -3; stamp "purified PNG folder"
zeropur-rt serve artifacts/resnet20 & SERVER=$!
zeropur-rt query http://127.0.0.1:8000 images --wait 300 | tee $W/query.txt
kill $SERVER; wait $SERVER || true; stamp "served + queried; all done"
