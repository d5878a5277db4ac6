"""The one ZeroPur loop (zeropur_rt.schedule) on every runner this machine has, each against tests/export/oracle.py
(ZeroPur from the paper's equations, sharing no code with the loop), and the proof that the host and device
flavours of the pipeline issue the same operations.

Runners: ONNX Runtime on the CPU (host kernels), the torch runner on the CPU (host kernels), the reference
(torch runner + the reference's torch kernel twins), and where the hardware is there: onnxruntime-gpu, the
torch runner on CUDA (CUDA kernels, CUDA graph), TensorRT (when the artifact has engines for this GPU).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from zeropur_rt import schedule  # noqa: E402
from zeropur_rt.config import ZeroPurConfig  # noqa: E402
from zeropur_rt.errors import ConfigError  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

SHORT = dict(gs_steps=3, ap_steps=4)
RUNNERS = ["onnxruntime", "torch", "reference", "onnxruntime-cuda", "torch-cuda", "tensorrt"]


def _make(kind: str, art, victim, overrides: dict) -> Purifier:
    if kind == "onnxruntime":
        return Purifier.load(art, threads=2, overrides=overrides)
    if kind == "torch":
        from zeropur_export.reference.torch_runner import load_purifier
        return load_purifier(art, victim=victim, overrides=overrides)
    if kind == "reference":
        from zeropur_export.reference.purifier import ReferencePurifier
        return ReferencePurifier(victim, Purifier.load(art, overrides=overrides).cfg).pipeline
    if kind == "onnxruntime-cuda":
        import onnxruntime as ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("no onnxruntime-gpu here (CPU onnxruntime): the CUDA execution provider is absent")
        return Purifier.load(art, device="cuda", overrides=overrides)
    if kind == "torch-cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU visible to torch")
        from zeropur_export.reference.torch_runner import load_purifier
        return load_purifier(art, device="cuda", victim=victim, overrides=overrides)
    if kind == "tensorrt":
        import importlib.util
        if importlib.util.find_spec("tensorrt") is None:
            pytest.skip("TensorRT is not installed here")
        from zeropur_rt.manifest import load_manifest
        if not load_manifest(art).engines:
            pytest.skip("the test artifact has no TensorRT engines (tests/gpu/test_tensorrt.py builds them)")
        return Purifier.load(art, backend="tensorrt", overrides=overrides)
    raise KeyError(kind)


@pytest.fixture(params=RUNNERS)
def make(request, art20, victim20):
    made: list[Purifier] = []

    def build(**overrides) -> Purifier:
        made.append(_make(request.param, art20, victim20, overrides))
        return made[-1]
    yield build
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def x8(cifar):
    return cifar[0][:8]


def _oracle_out(victim, x: np.ndarray, second_order: bool = False) -> np.ndarray:
    """tests/export/oracle.py's purified images (the short recipe) in the victim's precision; ``second_order``: torch's
    convolutions in their other float32 summation order (oneDNN off)."""
    import oracle
    from zeropur_export.graphs.parity import in_second_float32_order
    v = oracle.OracleVictim(victim.net, victim.mean.flatten().tolist(), victim.std.flatten().tolist(),
                            victim.spec.embedding, victim.spec.ila, victim.spec.lpips)
    run = lambda: oracle.purify(v, torch.from_numpy(x).to(victim.mean.dtype), oracle.Recipe(**SHORT)).out.numpy()  # noqa: E731
    out = in_second_float32_order(run) if second_order else None
    return run() if out is None else out


def _stepped_apart(a: np.ndarray, truth: np.ndarray, step: float) -> float:
    """Share of pixels more than half a sign step from the truth: a step taken the other way somewhere (float32
    rounding alone moves a pixel by ~1e-8, a step by >= 7.8e-4)."""
    return float((np.abs(a.astype(np.float64) - truth) > step / 2).mean())


@pytest.fixture(scope="module")
def oracle_short(victim20, x8):
    """The oracle in float64 (the truth) and the float32 floor: the larger share of pixels that the oracle's own
    float32 runs, in both of torch's summation orders, step apart from the truth, and their prediction misses."""
    truth = _oracle_out(victim20.to_dtype(torch.float64), x8)
    cfg = ZeroPurConfig().replace(**SHORT)
    with torch.no_grad():
        pred = victim20(torch.from_numpy(truth).float()).argmax(1).numpy()
        floors = [_oracle_out(victim20, x8, second) for second in (False, True)]
        misses = max(int((victim20(torch.from_numpy(f)).argmax(1).numpy() != pred).sum()) for f in floors)
    share = max(_stepped_apart(f, truth, min(cfg.gs_step, cfg.ap_step)) for f in floors)
    return truth, pred, share, misses


def test_loop_agrees_with_the_oracle(make, x8, oracle_short):
    """Same images, same short recipe: every runner (the reference too) against tests/export/oracle.py in float64. A
    runner steps at most twice as many pixels the other way as float32 itself does (the oracle in float32, either
    summation order; two float32 orders land within 2x of each other), and misses at most one prediction more."""
    pur = make(**SHORT)
    out, pred = pur.purify_and_classify(x8)
    truth, truth_pred, share, misses = oracle_short
    assert out.dtype == np.float32 and out.shape == x8.shape
    assert np.all(np.abs(out - x8) <= pur.cfg.eps + 1e-6) and out.min() >= 0 and out.max() <= 1
    got = _stepped_apart(out, truth, min(pur.cfg.gs_step, pur.cfg.ap_step))
    print(f"\n{pur.runner.name}: {got:.4f} of pixels stepped apart from the float64 oracle (float32 floor {share:.4f}); "
          f"{int((pred != truth_pred).sum())} prediction(s) differ (floor {misses})")
    assert 0 < share and got <= 2 * share
    assert int((pred != truth_pred).sum()) <= misses + 1


def test_iterates_and_early_outs(make, x8):
    pur = make(**SHORT)
    x = x8[:4]
    res = pur.run(x, iterates=True)
    out, trace = res.images, res.iterates
    assert res.logits is None and res.times is None
    assert len(trace.gs_x) == 3 and len(trace.ap_x) == 4
    assert np.array_equal(trace.gs_x[0], x) and np.array_equal(trace.ap_x[0], x)
    assert np.array_equal(pur.purify(x), out)  # observing changes nothing
    assert np.array_equal(pur.project(x, trace.coarse), out)  # AP alone from the same coarse image
    gs_only = make(gs_steps=3, ap_steps=0)
    assert np.array_equal(gs_only.purify(x), trace.coarse)
    identity = make(gs_steps=0, ap_steps=0)
    assert np.array_equal(identity.purify(x), x)
    tr = make(gs_steps=0, ap_steps=4).run(x, iterates=True).iterates
    assert np.array_equal(tr.coarse, x) and len(tr.gs_x) == 0


def test_stage_timings_cover_every_stage(make, x8):
    pur = make(**SHORT)
    st = pur.run(x8[:2], classify=True, timings=True).times
    assert set(st.seconds) == set(schedule.STAGES)
    assert st.total > 0 and all(v >= 0 for v in st.seconds.values())


def test_batch_states_are_cached_and_evicted(make, x8):
    pur = make(gs_steps=1, ap_steps=1)
    first = {n: pur.purify(x8[:n]) for n in (1, 2, 3)}
    for n in (4, 5, 6, 1, 2, 3):  # more sizes than max_cached_batches: the early states are rebuilt
        out = pur.purify(x8[:n])
        if n in first:
            assert np.array_equal(out, first[n])
    assert len(pur.loops.cached_sizes) <= pur.loops.max_cached


def test_ap_steps_need_ap_graphs(art20):
    pur = Purifier.load(art20, overrides=SHORT)
    with pytest.raises(ValueError, match="no Adaptive Projection graphs"):
        Purifier(pur.runner, pur.kernels, pur.cfg, input_shape=pur.chw, batch=pur.batch, has_ap=False)


# ---------------------------------------------------------------- host and device flavours: the same operations


class _Token:
    """A buffer of the recording device runner: a name and a shape, no memory."""

    def __init__(self, name: str, shape):
        self.name, self.shape, self.ptr = name, tuple(shape), 1


class Recording:
    """Wraps a runner and a kernel set, logging every operation with the loop buffers it touches (by name)."""

    def __init__(self, runner, kernels, log: list):
        self.runner, self.kernels, self.log = runner, kernels, log
        self.names: dict[int, str] = {}
        self.name, self.device, self.on_device = runner.name, runner.device, runner.on_device

    def _n(self, buf) -> str:
        return self.names.get(id(buf), "?")

    def alloc(self, shape, name):
        buf = self.runner.alloc(shape, name)
        self.names[id(buf)] = name
        return buf

    def output_shapes(self, graph, n):
        return self.runner.output_shapes(graph, n)

    def run(self, graph, inputs, outputs):
        self.log.append(("run", graph, tuple(sorted((k, self._n(v)) for k, v in inputs.items())),
                         tuple(sorted((k, self._n(v)) for k, v in outputs.items()))))
        self.runner.run(graph, inputs, outputs)

    def __getattr__(self, op):  # copy, zero, upload, download, sync, capture, release, close
        fn = getattr(self.runner, op)

        def logged(*args, **kwargs):
            if op in ("copy", "zero", "upload", "download"):
                self.log.append((op, *[self.names[id(a)] for a in args if id(a) in self.names]))
            if op == "capture":
                self.log.append(("capture",))
            return fn(*args, **kwargs)
        return logged

    def kernel_set(self):
        rec = self

        class Kernels:
            name = "recorded"

            def blur(self, src, dst, sigma):
                rec.log.append(("blur", rec._n(src), rec._n(dst)))
                rec.kernels.blur(src, dst, sigma)

            def gs_update(self, x, g, m, x_in, l1, cfg):
                rec.log.append(("gs_update", *map(rec._n, (x, g, m, x_in, l1))))
                rec.kernels.gs_update(x, g, m, x_in, l1, cfg)

            def ap_update(self, x, g, x_in, cfg):
                rec.log.append(("ap_update", *map(rec._n, (x, g, x_in))))
                rec.kernels.ap_update(x, g, x_in, cfg)

            def close(self):
                pass
        return Kernels()


class DeviceRecorder:
    """The device side of the pipeline's contract, with no device: buffers are tokens, graphs and kernels do
    nothing, ``capture`` records what the loop enqueues and ``launch`` replays nothing. It stands for any
    device runner (TensorRT, torch on CUDA): what the pipeline asks of one is all it implements."""

    name, device, on_device = "device-recorder", "cuda:0", True

    def __init__(self, shapes_from, log: list):
        self.shapes_from, self.log = shapes_from, log

    def alloc(self, shape, name):
        return _Token(name, shape)

    def output_shapes(self, graph, n):
        return self.shapes_from.output_shapes(graph, n)

    def run(self, graph, inputs, outputs): ...
    def copy(self, dst, src): ...
    def zero(self, buf): ...
    def upload(self, dst, src): ...

    def download(self, src):
        return np.zeros(src.shape, np.float32)

    def sync(self): ...
    def release(self, buffers, n=None): ...
    def close(self): ...

    def capture(self, enqueue):
        start = len(self.log)
        enqueue()
        captured = self.log[start:]
        del self.log[start:]
        log = self.log

        class Replay:
            ops = captured

            def launch(self):
                log.append(("replay", len(captured)))

            def close(self): ...
        self.replay = Replay()
        return self.replay


def test_host_and_device_flavours_issue_the_same_operations(art20, x8):
    host_log: list = []
    base = Purifier.load(art20, overrides=SHORT)
    rec = Recording(base.runner, base.kernels, host_log)
    host = Purifier(rec, rec.kernel_set(), base.cfg, input_shape=base.chw, batch=base.batch, has_ap=True)
    host.purify_and_classify(x8[:2])
    host.purify_and_classify(x8[:2])
    assert not [op for op in host_log if op[0] in ("capture", "replay")]  # host runners never capture

    dev_log: list = []
    no_kernels = type("NoKernels", (), {"blur": lambda *a: None, "gs_update": lambda *a: None,
                                        "ap_update": lambda *a: None})()
    dev = Recording(DeviceRecorder(base.runner, dev_log), no_kernels, dev_log)
    device = Purifier(dev, dev.kernel_set(), base.cfg, input_shape=base.chw, batch=base.batch, has_ap=True)
    assert device.loops.cuda_graph  # a device runner gets the captured loop
    device.purify_and_classify(x8[:2])
    first_call = list(dev_log)
    device.purify_and_classify(x8[:2])
    second_call = dev_log[len(first_call):]

    one_call = host_log[:len(host_log) // 2]
    assert host_log[len(host_log) // 2:] == one_call  # every call issues the same operations
    loop = [op for op in one_call if op[0] not in ("upload", "download")]
    # first device call: the same operations as the host's, then the capture of the loop alone
    assert first_call[:-1] == one_call and first_call[-1] == ("capture",)
    captured = device.runner.runner.replay.ops
    assert captured == [op for op in loop if op[:2] != ("run", "classifier")]
    assert len(captured) == 2 + 3 * 3 + 2 + 4 * 2  # copy+zero, GS x (blur, graph, update), setup+copy, AP x 2
    # later device calls: upload, one graph launch, classify, downloads
    assert [op[0] for op in second_call] == ["upload", "replay", "run", "download", "download"]
    assert second_call[1] == ("replay", len(captured))


# ---------------------------------------------------------------- a randomised config: seeded draws, the same loop

RANDOMISED = dict(SHORT, random_start=True, blur_sigma_jitter=0.5)


def test_randomised_loop_draws_from_its_seed_on_every_runner(make, x8, victim20):
    """Random start + jittered blur: every runner stays in the eps ball and [0, 1]; one seed is one sequence of
    draws (``reseed`` replays it, the next call draws afresh); the reference given that seed starts GS and
    AP from the very same images and classifies the purified images as the runner does."""
    from zeropur_export.reference.purifier import ReferencePurifier
    pur = make(**RANDOMISED)
    assert pur.cfg.randomised
    x = x8[:4]
    pur.reseed(5)
    res = pur.run(x, classify=True, iterates=True)
    out, pred, trace = res.images, res.labels, res.iterates
    again = pur.purify(x)
    pur.reseed(5)
    assert np.array_equal(pur.purify(x), out) and not np.array_equal(again, out)
    eps = pur.cfg.eps
    for img in (out, trace.gs_x[0], trace.ap_x[0]):
        assert np.all(np.abs(img - x) <= eps + 1e-6) and img.min() >= 0 and img.max() <= 1
    assert not np.array_equal(trace.gs_x[0], x) and not np.array_equal(trace.ap_x[0], trace.gs_x[0])
    ref = ReferencePurifier(victim20, pur.cfg, seed=5)
    ref_out, ref_trace = ref.purify_with_iterates(torch.from_numpy(x))
    assert np.array_equal(ref_trace.gs_x[0], trace.gs_x[0]) and np.array_equal(ref_trace.ap_x[0], trace.ap_x[0])
    with torch.no_grad():
        assert (victim20(ref_out).argmax(1).numpy() == pred).mean() >= 3 / 4


def test_draws_follow_the_config():
    rng = np.random.default_rng(0)
    det = ZeroPurConfig(gs_steps=4)
    assert schedule.draw(det, (2, 3, 4, 4), rng) is None
    assert np.array_equal(rng.random(3), np.random.default_rng(0).random(3))  # a deterministic run draws nothing
    d = schedule.draw(det.replace(blur_sigma_jitter=0.25), (2, 3, 4, 4), rng)
    assert d.gs_offset is None and d.ap_offset is None and len(d.sigmas) == 4 and len(set(d.sigmas)) == 4
    assert all(0.75 * det.blur_sigma <= s <= 1.25 * det.blur_sigma for s in d.sigmas)
    d = schedule.draw(det.replace(random_start=True, ap_steps=0), (2, 3, 4, 4), rng)
    assert d.sigmas == (det.blur_sigma,) * 4 and d.ap_offset is None
    assert d.gs_offset.dtype == np.float32 and np.abs(d.gs_offset).max() <= det.eps and d.gs_offset.std() > det.eps / 3
    for bad, msg in ((dict(blur_sigma_jitter=1.0), "blur_sigma_jitter"),
                     (dict(blur_sigma_jitter=-0.1), "blur_sigma_jitter"),
                     (dict(random_start="yes"), "random_start must be true or false")):
        with pytest.raises(ConfigError, match=msg):
            ZeroPurConfig(**bad)


def test_randomised_config_is_never_captured(art20, x8):
    """A captured CUDA graph would replay one draw forever: a device runner runs a randomised config eagerly."""
    log: list = []
    base = Purifier.load(art20, overrides=RANDOMISED)
    no_kernels = type("NoKernels", (), {"blur": lambda *a: None, "gs_update": lambda *a: None,
                                        "ap_update": lambda *a: None})()
    dev = Recording(DeviceRecorder(base.runner, log), no_kernels, log)
    device = Purifier(dev, dev.kernel_set(), base.cfg, input_shape=base.chw, batch=base.batch, has_ap=True)
    assert device.loops.cuda_graph
    for _ in range(3):
        device.purify_and_classify(x8[:2])
    assert not [op for op in log if op[0] in ("capture", "replay")]
    assert sum(op[0] == "blur" for op in log) == 3 * SHORT["gs_steps"]
