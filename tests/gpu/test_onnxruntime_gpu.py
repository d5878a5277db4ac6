"""GPU tests of the onnxruntime backend's CUDA and TensorRT execution providers (onnxruntime-gpu):
every graph against the CPU provider, and the Purifier on the GPU against the torch reference.

Skipped, with the reason, where onnxruntime has no CUDA execution provider.
"""
from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)",
                allow_module_level=True)
torch = pytest.importorskip("torch")

from benchmarks.runtime_parity import free_running  # noqa: E402
from zeropur_rt.pipeline import Purifier  # noqa: E402

PROVIDERS = [p for p, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
             if name in ort.get_available_providers()]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_graph_matches_the_cpu_provider(art20, cifar, provider):
    gpu = Purifier.load(art20, device="cuda", provider=provider)
    # issue 16 item 4: the sessions really run on the provider asked for (the runner refuses a CPU fallback)
    want = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    assert all(s.get_providers()[0] == want for s in gpu.runner.sessions.values())
    cpu = Purifier.load(art20, threads=2)
    x = cifar[0][:16]
    xb = np.empty_like(x)
    cpu.kernels.blur(x, xb, cpu.cfg.blur_sigma)
    coarse = np.clip(x + cpu.cfg.eps * np.sign(np.random.default_rng(0).random(x.shape) - 0.5), 0, 1).astype(np.float32)
    feeds = {"classifier": {"x": x}, "gs_grad": {"x": x, "x_blur": xb}, "ap_setup": {"x_in": x, "coarse": coarse},
             "ap_grad": cpu.run_graph("ap_setup", {"x_in": x, "coarse": coarse}) | {"fine": coarse}}
    # judged by the CPU tests' rule (zeropur_export.graphs.parity.ParityRow.ok) against the float64 reference on the GPU,
    # its float32 spread and flips measured by torch on the GPU in cuDNN's order and in its second (cuDNN off)
    from zeropur_export.graphs.parity import (ABS_FLOOR, ParityRow, conditioning_floor, format_table, in_second_float32_order,
                                       parity_row, torch_outputs)
    from zeropur_export.victims.zoo import load_victim
    v32 = load_victim("resnet20").to("cuda")
    v64 = v32.to_dtype(torch.float64)
    rows: list[ParityRow] = []
    for g, f in feeds.items():
        on_gpu, on_cpu = gpu.run_graph(g, f), cpu.run_graph(g, f)
        ins = [torch.from_numpy(f[k]).cuda() for k in f] if g != "ap_grad" else \
            [torch.from_numpy(f["fine"]).cuda(), *(torch.from_numpy(f[k]).cuda() for k in f if k != "fine")]
        truth = torch_outputs(v64, gpu.cfg, g, ins)
        t32 = torch_outputs(v32, gpu.cfg, g, ins)
        alt = in_second_float32_order(torch_outputs, v32, gpu.cfg, g, ins, device="cuda")
        for i, name in enumerate(on_cpu):
            a, b = on_gpu[name], on_cpu[name]
            assert a.shape == b.shape and a.dtype == np.float32
            refs = [t32[i]] + ([alt[i]] if alt is not None else [])
            floor = conditioning_floor(v64, *ins) if (g, name) == ("gs_grad", "grad") else ABS_FLOOR  # as the CPU's
            rows.append(parity_row("resnet20", g, name, provider, a, refs, truth[i], floor))
    print("\n" + format_table(rows))
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_purifier_on_the_gpu_agrees_with_reference(art20, victim20, cifar, provider):
    pur = Purifier.load(art20, device="cuda", provider=provider)
    x, y = cifar[0][:64], cifar[1][:64]
    r = free_running(pur, victim20, x, y, batch=32)
    print(f"\n{provider}: same prediction {r['same_prediction']:.4f}, same pixels {r['same_pixels']:.4f}")
    assert r["same_prediction"] >= 62 / 64
