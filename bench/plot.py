"""Figure of the quality study (``bench/results/quality/quality.json`` of ``bench/quality.py``):
(a) training-loss curves, mean over seeds at each method's chosen lr; (b) strict accuracy on the test split
(unseen stories) and on test_seen (the training stories, new numbers), mean ± std over seeds, beside the
base model zero-shot; (c) LoRA-SB's captured estimation
energy per module and layer (sum sigma_r^2 / ||dW||_F^2, the ``energy`` metadata of its init file).

    python bench/plot.py --json bench/results/quality/quality.json --out bench/results/quality/quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

COLORS = {"base": "tab:green", "lorasb": "tab:red", "loraxs": "tab:orange", "lora": "tab:blue", "full": "tab:gray",
          "lorasb_lr_eff": "tab:purple", "lorasb_svd": "tab:pink"}
LABELS = {"base": "base, zero-shot", "lorasb": "LoRA-SB", "loraxs": "LoRA-XS", "lora": "LoRA", "full": "full FT",
          "lorasb_lr_eff": "LoRA-SB, lr_eff 1e-4", "lorasb_svd": "LoRA-SB, conv. SVD"}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mean_curve(curves: list[list[list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every curve, with the mean, min and max loss at each."""
    steps = sorted(set.intersection(*[{int(s) for s, _ in c} for c in curves]))
    by_run = [{int(s): loss for s, loss in c} for c in curves]
    values = [[run[s] for run in by_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _stats(values: list[float]) -> tuple[float, float]:
    return (100 * statistics.fmean(values), 100 * statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(data: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 0.8, 1.3]})
    for m, res in rows.items():
        if not res.get("curves"):
            continue
        steps, mean, lo, hi = mean_curve(res["curves"])
        label = f"{LABELS[m]} (r={res['r']}, lr={res['lr']:g})" if res.get("r") else f"{LABELS[m]} (lr={res['lr']:g})"
        n = len(res["curves"])
        ax1.plot(steps, mean, color=COLORS[m], label=f"{label}, {n} seed{'s' * (n > 1)}")
        if n > 1:
            ax1.fill_between(steps, lo, hi, color=COLORS[m], alpha=0.15, linewidth=0)
    ax1.set_xlabel("optimizer step")
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss (response tokens, log scale)")
    ax1.set_title("(a) training loss, mean over seeds (band: min-max)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)

    scored = [m for m, r in rows.items() if r.get("strict")]
    for i, m in enumerate(scored):
        for j, (kind, hatch) in enumerate((("strict", ""), ("seen_strict", "//"))):
            if rows[m].get(kind):
                mean, std = _stats(rows[m][kind])
                ax2.bar(i + (j - 0.5) * 0.38, mean, width=0.38, yerr=std, color=COLORS[m], hatch=hatch,
                        alpha=0.9 if kind == "strict" else 0.5, capsize=3)
    ax2.set_xticks(range(len(scored)), [LABELS[m].replace(", ", ",\n") for m in scored], fontsize=8, rotation=15)
    ax2.set_ylabel("strict accuracy % (plain: test; hatched: test_seen)")
    ax2.set_title("(b) held-out accuracy, mean ± std over seeds")
    ax2.grid(alpha=0.3, axis="y")

    energies = data.get("energy")
    if energies:
        layers = sorted({_layer(n) for n in energies})
        for j, mod in enumerate(MODULES):
            points = sorted((_layer(n), e) for n, e in energies.items() if n.endswith("." + mod))
            if points:
                ax3.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2.5,
                         label=mod, color=plt.cm.tab10(j))
        ax3.set_xticks(layers[::max(1, len(layers) // 10)])
        ax3.set_xlabel("layer")
        ax3.set_ylim(0, 1.05)
        ax3.set_ylabel(r"captured energy $\sum\sigma_r^2 / \|\Delta W\|_F^2$")
        r = rows.get("lorasb", {}).get("r")
        ax3.set_title(f"(c) LoRA-SB estimate: energy kept by the rank-{r} SVD")
        ax3.legend(fontsize=7, ncol=4, loc="lower right")
        ax3.grid(alpha=0.3)
    else:
        ax3.text(0.5, 0.5, "no LoRA-SB run yet", ha="center", va="center")
        ax3.set_axis_off()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench/results/quality/quality.json", help="bench/quality.py's report")
    p.add_argument("--out", default="bench/results/quality/quality.png", help="PNG to write (default: %(default)s)")
    args = p.parse_args(argv)
    print(f"[plot] written to {plot(json.load(open(args.json)), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
