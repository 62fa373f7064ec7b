"""Figure of a quality study: (a) training-loss curves of the methods, mean over seeds at each method's
chosen lr; (b) LoRA-SB's captured estimation energy per module (sum sigma_r^2 / ||dW||_F^2, the
``energy`` metadata of ``lorasb_init.safetensors``).

    python bench/plot.py --json bench/results/quality.json --out bench/results/quality.png
    python bench/plot.py --json ... --init outputs/quality/runs/lorasb_lr0.005_seed1/lorasb_init.safetensors

Without ``--init`` the energies come from the JSON (``bench/quality.py`` stores those of each LoRA-SB run;
the first seed's at the chosen lr is drawn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

COLORS = {"lorasb": "tab:red", "loraxs": "tab:orange", "lora": "tab:blue", "full": "tab:gray"}
LABELS = {"lorasb": "LoRA-SB", "loraxs": "LoRA-XS", "lora": "LoRA", "full": "full FT"}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mean_curve(curves: list[list[list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every curve, with the mean, min and max loss at each."""
    steps = sorted(set.intersection(*[{int(s) for s, _ in c} for c in curves]))
    by_run = [{int(s): loss for s, loss in c} for c in curves]
    values = [[run[s] for run in by_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(data: dict, energies: dict[str, float] | None, out: str, source: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["output_dir"].rstrip("/").rsplit("/", 1)[-1]: r for r in data["runs"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.25]})
    for res in data["results"]:
        curves = [runs[name]["curve"] for name in res["runs"] if name in runs and runs[name].get("curve")]
        if not curves:
            continue
        steps, mean, lo, hi = mean_curve(curves)
        m = res["method"]
        label = f"{LABELS.get(m, m)} (r={res['r']}, lr={res['lr']:g})" if m != "full" else \
            f"{LABELS[m]} (lr={res['lr']:g})"
        ax1.plot(steps, mean, color=COLORS.get(m), label=f"{label}, {len(curves)} seed{'s' * (len(curves) > 1)}")
        if len(curves) > 1:
            ax1.fill_between(steps, lo, hi, color=COLORS.get(m), alpha=0.15, linewidth=0)
    ax1.set_xlabel("optimizer step")
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss (response tokens, log scale)")
    ax1.set_title("(a) training loss, mean over seeds (band: min-max)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    if energies:
        names = sorted(energies, key=_module_order)
        layers = sorted({_layer(n) for n in names})
        width = 0.8 / len(MODULES)
        for j, mod in enumerate(MODULES):
            xs = [layers.index(_layer(n)) + (j - (len(MODULES) - 1) / 2) * width for n in names if n.endswith(mod)]
            ys = [energies[n] for n in names if n.endswith(mod)]
            if xs:
                ax2.bar(xs, ys, width=width, label=mod, color=plt.cm.tab10(j))
        ax2.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax2.set_ylim(0, 1.15)
        ax2.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax2.set_ylabel(r"captured energy $\sum\sigma_r^2 / \|\Delta W\|_F^2$")
        r = next((res["r"] for res in data["results"] if res["method"] == "lorasb"), None)
        ax2.set_title(f"(b) LoRA-SB estimate: energy kept by the rank-{r} SVD" if r else "(b) LoRA-SB energy")
        ax2.legend(fontsize=7, ncol=len(MODULES), loc="upper center", handlelength=1, columnspacing=0.8)
        ax2.grid(alpha=0.3, axis="y")
        if source:
            ax2.text(0.99, -0.14, source, transform=ax2.transAxes, ha="right", fontsize=7, color="gray")
    else:
        ax2.text(0.5, 0.5, "no LoRA-SB init file", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def _module_order(name: str) -> tuple[int, int]:
    mod = name.rsplit(".", 1)[-1]
    return _layer(name), MODULES.index(mod) if mod in MODULES else len(MODULES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="the --json output of bench/quality.py")
    p.add_argument("--init", help="a lorasb_init.safetensors whose energies to draw (default: from the JSON)")
    p.add_argument("--out", default="bench/results/quality.png", help="PNG to write (default: %(default)s)")
    args = p.parse_args(argv)
    data = json.load(open(args.json))
    if args.init:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from lorasb_ds.init import read_init_metadata

        energies = read_init_metadata(args.init)["energy"]
        source = os.path.basename(os.path.dirname(os.path.abspath(args.init)))
    else:
        runs = {r["output_dir"].rstrip("/").rsplit("/", 1)[-1]: r for r in data["runs"]}
        chosen = [runs[n] for res in data["results"] if res["method"] == "lorasb" for n in res["runs"] if n in runs]
        lorasb = next((r for r in chosen if r.get("energy")), None)
        energies = lorasb["energy"] if lorasb else None
        source = os.path.basename(lorasb["output_dir"]) if lorasb else ""
    print(f"[plot] written to {plot(data, energies, args.out, source)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
