"""Render bench/results/finetune_*.json as the tables of docs/finetune.md (between the markers)
and, when matplotlib is installed, the loss-curve plot docs/finetune_loss.png.

    python examples/ft_report.py [RESULTS.json] [--doc docs/finetune.md] [--png docs/finetune_loss.png]
"""
from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL = {"spallm": "SpaLLM LUTs (fp32 master)", "spallm_bf16lut": "SpaLLM LUTs (bf16 only)",
         "lora": "LoRA r=8 (fp32 base)", "qlora": "QLoRA r=8 (NF4 base)"}
BASE = {"sketch": "4-bit sketch (fp32 LUTs)", "fp32": "fp32", "nf4": "NF4 b64"}
ORDER = ("spallm", "spallm_bf16lut", "lora", "qlora")
COLOR = {"spallm": "tab:blue", "spallm_bf16lut": "tab:orange", "lora": "tab:green", "qlora": "tab:red"}


def _mb(b) -> str:
    return f"{b / 2**20:.0f}"


def results_table(rows) -> str:
    out = ["| task | method | trainable params | steps | train s | s/step | peak RSS MB (train) | "
           "weights MB (linears + rest) | final train loss | held-out loss | accuracy | lost updates |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    key = lambda r: (r["task"], r["steps"] > 0, ORDER.index(r["method"]))  # noqa: E731
    for r in sorted(rows, key=key):
        trained = r["steps"] > 0
        if not trained and r["method"] == "spallm_bf16lut":
            name = "untuned: 4-bit sketch, LUTs rounded to bf16"
        else:
            name = LABEL[r["method"]] if trained else f"untuned: {BASE[r['base']]}"
        lost = [x["lost_frac"] for x in r.get("lost_updates", [])]
        out.append("| " + " | ".join([
            r["task"], name,
            f"{r['trainable_params']:,}" if trained else "",
            str(r["steps"]),
            f"{r['train_time_s']:.0f}" if trained else "",
            f"{r['s_per_step']:.2f}" if trained else "",
            f"{r['peak_rss_train_mb']:.0f}" if trained else "",
            f"{_mb(r['decoder_linear_bytes'])} + {_mb(r['other_bytes'])}",
            f"{r['final_train_loss']:.3f}" if trained else "",
            f"{r['heldout_loss']:.3f}",
            f"{r['accuracy']:.3f}",
            f"{100 * sum(lost) / len(lost):.1f} %" if lost else "",
        ]) + " |")
    return "\n".join(out)


def curve_table(rows, task: str) -> str:
    runs = {r["method"]: r for r in rows if r["task"] == task and r["steps"] > 0}
    methods = [m for m in ORDER if m in runs]
    if not methods:
        return ""
    steps = [c["step"] for c in runs[methods[0]]["curve"]]
    out = ["| step | " + " | ".join(LABEL[m] for m in methods) + " |",
           "|---:|" + "---:|" * len(methods)]
    for i, s in enumerate(steps):
        vals = []
        for m in methods:
            c = runs[m]["curve"]
            vals.append(f"{c[i]['loss']:.3f}" if i < len(c) else "")
        out.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def plot(rows, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = sorted({r["task"] for r in rows if r["steps"] > 0})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in ORDER:
            r = next((r for r in rows if r["task"] == task and r["method"] == m and r["steps"] > 0), None)
            if r:
                ax.plot([c["step"] for c in r["curve"]], [c["loss"] for c in r["curve"]], label=LABEL[m],
                        color=COLOR[m], marker=".")
        ax.set_title(f"{task}: train loss on answer tokens")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean of each logging window)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def replace_between(doc: str, name: str, text: str) -> str:
    a, b = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if a not in doc:
        return doc
    return doc[: doc.index(a) + len(a)] + "\n" + text + "\n" + doc[doc.index(b):]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", default=os.path.join(ROOT, "bench/results/finetune_smollm2_cpu.json"))
    p.add_argument("--doc", default=os.path.join(ROOT, "docs/finetune.md"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs/finetune_loss.png"))
    a = p.parse_args(argv)
    with open(a.results) as f:
        rows = json.load(f)["rows"]
    sections = {"results": results_table(rows)}
    for task in sorted({r["task"] for r in rows}):
        sections[f"curve-{task}"] = curve_table(rows, task)
    if os.path.isfile(a.doc):
        with open(a.doc) as f:
            doc = f.read()
        for name, text in sections.items():
            doc = replace_between(doc, name, text)
        with open(a.doc, "w") as f:
            f.write(doc)
    else:
        print("\n\n".join(sections.values()))
    if a.png and plot(rows, a.png):
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
