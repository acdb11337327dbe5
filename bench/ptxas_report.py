"""Registers and spills of every CUDA kernel as ptxas reports them (no GPU needed).

    python bench/ptxas_report.py --arch 90a --out bench/results/ptxas_sm90a.json

Compiles each csrc/cuda/*.cu with `nvcc -Xptxas -v` (the flags of .ci/cuda_compile_check.sh) and
writes one row per kernel instantiation: demangled name, registers, stack frame and spill bytes.
Spills in a main loop cost local-memory traffic, and the register count sets how many blocks fit
on an SM (65536 registers: 2 blocks of 256 threads need <= 128), so this is the first thing to read
when a kernel is slower than its roofline says.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"\(anonymous namespace\)::|spallm::cuda::", "", n).split("(")[0] for n in out]


def parse(log: str) -> list[dict]:
    rows = []
    for block in re.split(r"ptxas info\s*: (?=Compiling entry function)", log)[1:]:
        entry = ENTRY.search(block)
        frame, regs = FRAME.search(block), REGS.search(block)
        if not (entry and frame and regs):
            continue
        rows.append({"kernel": entry.group(1), "registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
                     "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))})
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90a", help="compute capability as nvcc spells it (80, 90a, ...)")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            cmd = [args.nvcc, "-std=c++17", f"-I{ROOT / 'csrc'}", "-O3", "--expt-relaxed-constexpr",
                   "-gencode", f"arch=compute_{args.arch},code=sm_{args.arch}", "-Xptxas", "-v",
                   "-c", str(cu), "-o", str(Path(tmp) / (cu.name + ".o"))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{cu.name}: nvcc failed\n{done.stderr[-2000:]}")
            for row in parse(done.stderr):
                rows.append({"file": cu.name, **row})
    for r in rows:
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        print(f"{r['file']:22s} {r['kernel']:58s} regs {r['registers']:4d}  spills {spill:4d} B")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT / "bench"))
        from common import git_commit  # the benchmarks' stamp: prose and earlier results are not "dirty"
        commit = git_commit()
        args.out.write_text(json.dumps({"arch": f"sm_{args.arch}", "nvcc": version, "commit": commit, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
