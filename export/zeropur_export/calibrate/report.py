"""Reports: the table of configs tried, the trade-off plot, markdown, and the files of a run (written atomically)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from zeropur_rt.config import ZeroPurConfig
from zeropur_rt.files import atomic_write_bytes, atomic_write_json, atomic_write_text

from .common import cfg_label, paper_config
from .scorer import ConfigScorer, Record
from .search import feasible


def rows_table(ev: ConfigScorer, recs: list[Record], chosen: Record | None, budget: float) -> list[dict[str, Any]]:
    """One JSON row per config tried, on the rows it reached."""
    rows = []
    for r in recs:
        s = ev.stats(r)
        c = r.cfg
        rows.append(dict(label=cfg_label(c), chosen=r is chosen, stages=r.stages, blur_sigma=c.blur_sigma,
                         eps_255=round(c.eps * 255, 6), gs_steps=c.gs_steps, gs_step_255=round(c.gs_step * 255, 6),
                         ap_steps=c.ap_steps, ap_step_255=round(c.ap_step * 255, 6) if c.ap_steps else None,
                         ila=(("n" if c.ila_normalized else "u") + f"{c.ila_weight:g}") if c.ap_steps else None,
                         n=s["n"], clean=round(s["clean"], 3), clean_purified=round(s["clean_purified"], 3),
                         pgd=round(s["pgd"], 3), pgd_purified=round(s["pgd_purified"], 3),
                         **{k: round(s[k], 3) for k in ("worst", "worst_purified") if k in s},
                         robust=round(s["robust"], 3), robust_base=round(s["robust_base"], 3),
                         clean_drop=round(s["clean"] - s["clean_purified"], 3),
                         within_budget=feasible(ev, r, budget), seconds=round(r.seconds, 2),
                         config=c.to_dict()))
    return rows


def write_plot(path: Path, rows: list[dict[str, Any]], budget: float, title: str, ylabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    stages = sorted({max(r["stages"]) for r in rows})
    marks = dict(zip(stages, "o^sD"))
    for st in stages:
        sub = [r for r in rows if max(r["stages"]) == st]
        for gs_only, col in ((True, "tab:blue"), (False, "tab:orange")):
            pts = [r for r in sub if (r["ap_steps"] == 0) == gs_only]
            if pts:
                ax.scatter([-r["clean_drop"] for r in pts], [r["robust"] for r in pts],
                           s=14 + 0.03 * np.array([r["n"] for r in pts]), marker=marks.get(st, "o"), color=col,
                           alpha=0.6, edgecolors="none", label=f"{'GS only' if gs_only else 'GS+AP'}, last stage {st}")
    for r in (r for r in rows if r["config"] == paper_config().to_dict()):
        ax.scatter([-r["clean_drop"]], [r["robust"]], marker="x", s=90, color="k", label=f"paper recipe (n={r['n']})")
    for r in (r for r in rows if r["chosen"]):
        ax.scatter([-r["clean_drop"]], [r["robust"]], marker="*", s=320, color="tab:red", edgecolors="k",
                   label=f"chosen (n={r['n']})", zorder=5)
    ax.axvline(-budget, color="tab:red", ls="--", lw=1, label=f"clean budget (-{budget:g} points)")
    ax.axvspan(-budget, max(1.0, max([-r["clean_drop"] for r in rows] + [0]) + 1), color="tab:green", alpha=0.06)
    ax.set_xlabel("purified clean acc - unpurified clean acc (points, same images)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _attack_text(a: dict[str, Any]) -> str:
    return (f"PGD-Linf {a['eps_255']:g}/255, step {a['step_255']:g}/255, {a['steps']} steps"
            f"{', random start' if a['random_start'] else ''}, on the bare classifier")


def _slice_text(rows: list[int] | None, n: int, data: str | None = None) -> str:
    """'rows 5000:6000 of `data`' where the CLI recorded them, else the image count."""
    if rows is None:
        return f"{n} images"
    return f"rows {rows[0]}:{rows[1]}" + (f" of `{data}`" if data else "")


def _objective_name(rep: dict[str, Any]) -> str:
    o = rep.get("objective", {})
    if o.get("name") != "worst":
        return f"PGD-{rep['attack']['steps']}"
    return f"worst-case (APGD-CE/DLR-{o['apgd_iter']}, BPDA-{o['bpda_steps']})"


def calibration_markdown(rep: dict[str, Any]) -> str:
    rows = rep["configs"]
    worst = rep.get("objective", {}).get("name") == "worst"
    obj = _objective_name(rep)
    L = [f"# ZeroPur calibration: {rep['model']}", ""]
    if rep.get("weights"):
        L.append(f"- weights: `{rep['weights']}` (sha256 {rep['weights_sha256'][:12]}...)")
    L += [f"- calibration {_slice_text(rep.get('calib_rows'), rep['n_calib'], rep.get('data'))}; attack {_attack_text(rep['attack'])}",
          f"- objective: max purified {obj} accuracy s.t. purified clean >= unpurified clean - {rep['max_clean_drop']:g} points (same images)"
          + (f"; {rep['objective']['bpda']}; an image counts as robust only if it survives all three" if worst else ""),
          f"- unpurified on all {rep['n_calib']} calibration images: clean {rep['unpurified']['clean']:.1f}%, PGD {rep['unpurified']['pgd']:.1f}%"
          + (f", APGD-CE+DLR worst case {rep['unpurified']['worst']:.1f}%" if worst else ""),
          f"- configs tried: {len(rows)}; wall time {rep['wall_seconds']:.0f} s (attack {rep['attack_seconds']:.0f} s{', cached' if rep['attack_cached'] else ''})",
          ""]
    if rep["chosen"]:
        c = rep["chosen"]
        L += [f"**Chosen:** {c['label']} -- n={c['n']}: clean {c['clean']:.1f}% -> {c['clean_purified']:.1f}% purified, "
              f"PGD {c['pgd']:.1f}% -> {c['pgd_purified']:.1f}% purified"
              + (f", worst case {c['worst']:.1f}% -> {c['worst_purified']:.1f}% purified" if worst else "") + ".", ""]
    else:
        L += [f"**No config met the budget.** {rep['message']}", ""]
    L += [f"- note: {note}" for note in rep.get("notes", [])]
    L += ["", "Accuracies are on the first n calibration rows; 'clean' and 'PGD' are the unpurified references on the same rows. "
          "Seconds: purification compute attributed to the config (shared Guided-Shift work split among the configs that reuse it).", "",
          "| # | stages | sigma | eps/255 | GS | GS step/255 | AP | AP step/255 | ILA | n | clean | clean purified | PGD | PGD purified | "
          + ("worst | worst purified | " if worst else "") + "drop | in budget | s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if worst else "") + "---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["n"], not rows[i]["within_budget"], -rows[i]["robust"]))
    for j, i in enumerate(order, 1):
        r = rows[i]
        mark = " **(chosen)**" if r["chosen"] else ""
        L.append(f"| {j}{mark} | {','.join(r['stages'])} | {r['blur_sigma']:g} | {r['eps_255']:.3g} | {r['gs_steps']} | {r['gs_step_255']:.3g} | {r['ap_steps']} | "
                 f"{'' if r['ap_step_255'] is None else format(r['ap_step_255'], '.3g')} | {r['ila'] or ''} | {r['n']} | {r['clean']:.1f} | "
                 f"{r['clean_purified']:.1f} | {r['pgd']:.1f} | {r['pgd_purified']:.1f} | "
                 + (f"{r['worst']:.1f} | {r['worst_purified']:.1f} | " if worst else "") + f"{r['clean_drop']:.1f} | "
                 f"{'yes' if r['within_budget'] else 'no'} | {r['seconds']:.1f} |")
    L += ["", "![trade-off](report.png)", ""]
    return "\n".join(L)


def write_calibration(out: Path, rep: dict[str, Any], config: ZeroPurConfig | None) -> None:
    """report.json, report.md, report.png, then calibrated_config.json when a config was chosen."""
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{rep['model']}: calibration {_slice_text(rep.get('calib_rows'), rep['n_calib'])}, PGD-{rep['attack']['steps']} "
             f"8/255, {len(rep['configs'])} configs, budget {rep['max_clean_drop']:g} pts")
    # the report first, the config last: a calibrated_config.json is only ever beside its own report
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", calibration_markdown(rep))
    write_plot(out / "report.png", rep["configs"], rep["max_clean_drop"], title, f"purified {_objective_name(rep)} accuracy (%)")
    cfg_path = out / "calibrated_config.json"
    if config is not None:
        atomic_write_json(cfg_path, config.to_dict())
    elif rep.get("fallback"):  # the closest miss, to try; "_budget" marks it (export and info warn about it)
        atomic_write_json(cfg_path, {**rep["fallback"]["config"], "_budget": rep["fallback"]["budget"]})
    elif cfg_path.exists():
        cfg_path.unlink()  # a stale config from an earlier run would contradict this report


def evaluation_table(rep: dict[str, Any]) -> str:
    steps = rep["attack"]["steps"]
    md = [f"| config | recipe | clean | clean, purified | PGD-{steps} | PGD-{steps}, purified | purify s/img |",
          "|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        md.append(f"| {r['config_name']} | {r['label']} | {r['clean']:.1f}% | {r['clean_purified']:.1f}% | {r['pgd']:.1f}% | "
                  f"{r['pgd_purified']:.1f}% | {r['purify_s_per_image']:.4f} |")
    return "\n".join(md)


def write_evaluation(out: Path, rep: dict[str, Any]) -> None:
    """eval.json and eval.md."""
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# ZeroPur evaluation: {rep['model']}, {_slice_text(rep.get('rows'), rep['n'])} ({rep['n']} images)", "",
          f"{_attack_text(rep['attack'])} (not adaptive).", "", evaluation_table(rep)]
    atomic_write_json(out / "eval.json", rep)
    atomic_write_text(out / "eval.md", "\n".join(md) + "\n")
