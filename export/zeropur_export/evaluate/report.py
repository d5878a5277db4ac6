"""The eval report: the markdown of one model's result (per-attack rows, the cascade, the worst case)."""
from __future__ import annotations

from typing import Any

from zeropur_export.recipes import describe
from zeropur_export.attacks.suite import WORST
from zeropur_rt.config import ZeroPurConfig


def _iterations(p: dict[str, Any]) -> str:
    it = str(p.get("max_iter", f"{p['queries']} queries" if "queries" in p else "-"))
    if p.get("targets"):
        it += f" x {p['targets']} targets"
    if p.get("eot", 1) > 1:
        it += f" x EOT {p['eot']}"
    return it


def _cascade_markdown(res: dict[str, Any]) -> list[str]:
    c, stages = res["clean"], res["cascade"]
    worst = stages[-1]["robust_acc_purified"]  # --attacks takes one or more
    wrong = c["n"] - c["correct_purified"].count("1")
    lines = [f"**Worst case over every attack: {worst:.1f}%** of {c['n']} images (AutoAttack's cascade: each attack, "
             "cheapest first, on the images the clean image and every earlier attack left robust; each figure is "
             "cumulative).",
             "",
             "| attack | kind | iterations | images attacked | broken | ZeroPur, robust after | attack s | purify s |",
             "|---|---|---|---|---|---|---|---|",
             f"| clean | - | - | {c['n']} | {wrong} | {c['acc_purified']:.1f}% | - | {c['purify_s']:.1f} |"]
    for r in stages:
        lines.append(f"| {r['attack']} | {r['group']} | {_iterations(r['params'])} | {r['attacked']} | {r['broken']} | "
                     f"{r['robust_acc_purified']:.1f}% | {r['attack_s']:.1f} | {r['purify_s']:.1f} |")
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The report: clean, then the worst cases, then each attack, with its budget and wall time."""
    cfg = res["purifier_config"]
    lines = [f"### {res['model']}: robust accuracy, L-inf eps {res['eps_255']:g}/255",
             "",
             f"Test rows {res['rows'][0]}:{res['rows'][1]} ({res['n']} images), seed {res['seed']}, purifier "
             f"{res['backend']} ({res['threads']} threads), {describe(ZeroPurConfig.from_dict(cfg))}. Robust = "
             "classified right after purification for every candidate the attack made.",
             ""]
    if "cascade" in res:
        lines += _cascade_markdown(res)
    else:
        from zeropur_export.attacks.query import markdown as query_markdown
        lines += _attack_table(res) + query_markdown(res["attacks"])
    lines += ["", "Attack s: wall time crafting the adversarial images (adaptive attacks purify inside it); purify s: "
              "purifying them for the ZeroPur column. Command: `zeropur-export eval " + " ".join(res["argv"]) + "`"]
    return "\n".join(lines)


def _attack_table(res: dict[str, Any]) -> list[str]:
    c = res["clean"]
    lines = ["| attack | kind | images | iterations | no purification | ZeroPur | attack s | purify s |",
             "|---|---|---|---|---|---|---|---|",
             f"| clean | - | {c['n']} | - | {c['acc']:.1f}% | {c['acc_purified']:.1f}% | - | {c['purify_s']:.1f} |"]
    worst = [r for r in res["attacks"] if r["group"] == "worst"]
    for r in sorted(worst, key=lambda r: r["attack"] != WORST) + [r for r in res["attacks"] if r["group"] != "worst"]:
        note = "" if r["n"] == c["n"] else f" (clean {r['clean_acc']:.1f}% / {r['clean_acc_purified']:.1f}%)"
        name = f"**{r['attack']}**" if r["group"] == "worst" else r["attack"]
        its = "-" if r["group"] == "worst" else _iterations(r["params"])
        lines.append(f"| {name} | {r['group']} | {r['n']}{note} | {its} | {r['robust_acc']:.1f}% | "
                     f"{r['robust_acc_purified']:.1f}% | {r['attack_s']:.1f} | {r['purify_s']:.1f} |")
    return lines
