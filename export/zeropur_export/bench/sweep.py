"""The GS/AP steps sweep of ``zeropur-export bench --sweep``: clean and PGD accuracy per step count."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from zeropur_export.bench.latency import bench_images, data_name, machine_info, save_fig
from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.progress import progress

if TYPE_CHECKING:
    from zeropur_export.victims.taps import Victim


def run_sweep(args: argparse.Namespace, victim: "Victim", cfg: ZeroPurConfig, overrides: dict[str, Any], art: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """GS/AP step counts vs latency (ONNX Runtime) and purified PGD-20 accuracy."""
    import torch

    from zeropur_export.attacks.pgd import pgd_linf
    from zeropur_rt.pipeline import Purifier
    x, ys = bench_images(args, victim, args.sweep_n, labels=True)
    adv = pgd_linf(victim, torch.from_numpy(x), torch.from_numpy(ys)).numpy()
    rows = []
    grid = [(g, a) for g in args.sweep_gs for a in args.sweep_ap]
    for gs, apn in progress(grid, "sweep"):
        # ap_step pinned: the eps -> ap_step rule would lengthen the steps as their count drops,
        # and the sweep asks what fewer steps of the recipe's size buy
        steps = dict(gs_steps=gs, ap_steps=apn, ap_step=cfg.ap_step)
        pur = Purifier.load(art, threads=args.threads, overrides={**overrides, **steps})
        t, correct_adv, correct_clean = 0.0, 0, 0
        for i in range(0, len(x), 50):
            t0 = time.perf_counter()
            _, p = pur.purify_and_classify(adv[i:i + 50])
            t += time.perf_counter() - t0
            correct_adv += int((p == ys[i:i + 50]).sum())
            correct_clean += int((pur.purify_and_classify(x[i:i + 50])[1] == ys[i:i + 50]).sum())
        rows.append(dict(gs_steps=gs, ap_steps=apn, s_per_image=t / len(x), purified_pgd_acc=100 * correct_adv / len(x),
                         purified_clean_acc=100 * correct_clean / len(x)))
        log(f"GS {gs:2d} AP {apn:2d}: {t / len(x):.4f} s/image, purified PGD {rows[-1]['purified_pgd_acc']:.1f}%, "
            f"purified clean {rows[-1]['purified_clean_acc']:.1f}%")
    return dict(kind="sweep", model=args.model, n=len(x), threads=args.threads, base_config=cfg.to_dict(),
                machine=machine_info(), data=data_name(args), rows=rows)


def sweep_markdown(res: dict[str, Any]) -> str:
    cfg = res["base_config"]
    lines = [f"Steps sweep, {res['model']}, {res['n']} images, ONNX Runtime CPU, {res['threads']} threads; PGD-20 "
             f"8/255 on the bare classifier; step sizes fixed at GS {cfg['gs_step'] * 255:.2g}/255 and AP "
             f"{cfg['ap_step'] * 255:.2g}/255 (fewer steps = a smaller move).", "", "| GS steps | AP steps | s/image | purified clean | purified PGD-20 |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['gs_steps']} | {r['ap_steps']} | {r['s_per_image']:.4f} | {r['purified_clean_acc']:.1f}% | "
                     f"{r['purified_pgd_acc']:.1f}% |")
    return "\n".join(lines)


def sweep_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        ax.scatter(r["s_per_image"], r["purified_pgd_acc"], c="C0")
        ax.annotate(f"GS{r['gs_steps']}/AP{r['ap_steps']}", (r["s_per_image"], r["purified_pgd_acc"]), fontsize=7)
    ax.set_xlabel("seconds per image (ONNX Runtime CPU)")
    ax.set_ylabel("purified PGD-20 accuracy (%)")
    ax.set_title(f"Latency vs robustness, {res['model']}")
    ax.grid(alpha=0.3)
    save_fig(fig, path)
