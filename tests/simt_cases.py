"""Build csrc/cuda/ for the SIMT emulator (tests/simt/) and run kernel cases on it.

The kernels' sources are compiled as C++ by the host compiler, unchanged but for two mechanical
rewrites that C++ cannot express (a `<<<grid, block, smem, stream>>>` launch becomes a call of
`simt::Launch`, an `extern __shared__` array becomes the block's dynamic shared memory), with
AddressSanitizer and UBSan. The executable is cached under build/simt/<hash of sources and flags>.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SIMT = Path(__file__).resolve().parent / "simt"
UNITS = ("lut_simple.cu", "lut_mma.cu", "lut_dx_mma.cu", "lut_grad_mma.cu", "lut_decode_fast.cu")
FLAGS = ["-std=c++17", "-O1", "-g0", "-DSPALLM_SIMT_EMULATOR", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-Wno-attributes"]
ENV = {"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=0",
       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}

# kernel<TArgs><<<grid, block[, smem[, stream]]>>>(args)  ->
#   ::simt::Launch(grid, block, smem, stream, "kernel<TArgs>")(kernel<TArgs>, args)
# (launch configurations are plain names or constants in csrc/cuda: a comma inside one would need
# a real parser, and would fail to compile here rather than pass silently)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>()]*>)?)<<<(.*?)>>>\(")
_EXTERN_SMEM = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def rewrite(source: str) -> tuple[str, int]:
    """The two mechanical rewrites; returns the new text and how many launches it rewrote."""
    def launch(m: re.Match) -> str:
        args = [a.strip() for a in m.group(2).split(",")]
        while len(args) < 4:
            args.append("0" if len(args) == 2 else "nullptr")
        grid, block, smem, stream = args
        return f'::simt::Launch({grid}, {block}, {smem}, {stream}, "{m.group(1)}")({m.group(1)}, '
    out, n = _LAUNCH.subn(launch, source)
    out = _EXTERN_SMEM.sub(r"\1* const \2 = ::simt::dynamic_smem<\1>();", out)
    return out, n


def _sources() -> dict[str, str]:
    files = {"codes.h": (CSRC / "codes.h").read_text()}
    for p in sorted((CSRC / "cuda").iterdir()):
        if p.suffix in (".cu", ".cuh", ".h") or p.name == "dispatch.cpp":
            files[f"cuda/{p.name}"] = p.read_text()
    for p in sorted(SIMT.rglob("*")):
        if p.is_file():
            files[f"simt/{p.relative_to(SIMT)}"] = p.read_text()
    return files


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("the SIMT emulator tests need a C++ compiler (g++), as the extension's build does")
    return cxx


_FAILED: dict[str, str] = {}  # a failed build is reported once per process, not rebuilt per test


def build() -> Path:
    """Compile (once per source state) and return the emulator executable."""
    files = _sources()
    cxx = compiler()
    key = hashlib.sha256(repr((sorted(files.items()), FLAGS, cxx)).encode()).hexdigest()[:16]
    if key in _FAILED:
        raise RuntimeError(_FAILED[key])
    try:
        return _build(files, cxx, key)
    except RuntimeError as e:
        _FAILED[key] = str(e)
        raise


def _build(files: dict[str, str], cxx: str, key: str) -> Path:
    out_dir = ROOT / "build" / "simt" / key
    exe = out_dir / "simt_kernels"
    if exe.exists():
        return exe
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=out_dir.parent))  # same file system: rename below
    src = tmp / "csrc"
    (src / "cuda").mkdir(parents=True)
    launches = 0
    for name, text in files.items():
        if name.startswith("simt/"):
            continue
        if name.endswith((".cu", ".cuh")):
            text, n = rewrite(text)
            launches += n
        (src / name).write_text(text)
    expected = sum(text.count("<<<") for name, text in files.items() if not name.startswith("simt/"))
    if launches != expected:
        raise RuntimeError(f"rewrote {launches} of {expected} kernel launches: a launch form the rewrite misses")
    include = ["-I", str(SIMT / "include"), "-I", str(src)]
    selftest = tmp / "selftest.cu"
    selftest.write_text(rewrite((SIMT / "selftest.cu").read_text())[0])
    jobs = [(src / "cuda" / u, tmp / (u + ".o")) for u in UNITS + ("dispatch.cpp",)] + [(SIMT / "harness.cpp", tmp / "harness.o"),
                                                                     (selftest, tmp / "selftest.o")]

    def compile_one(job):
        source, obj = job
        cmd = [cxx, *FLAGS, *include, "-x", "c++", "-c", str(source), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {source.name} for the emulator failed:\n{r.stderr[-6000:]}")
        return obj

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            objs = list(pool.map(compile_one, jobs))
        r = subprocess.run([cxx, *FLAGS, *map(str, objs), "-o", str(tmp / "simt_kernels")], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the emulator failed:\n{r.stderr[-6000:]}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out_dir.exists():
        tmp.rename(out_dir)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_case(path: Path, op: str, ints: dict, tensors: dict) -> None:
    with open(path, "wb") as f:
        f.write(f"simt-case\ns op {op}\n".encode())
        for k, v in ints.items():
            f.write(f"i {k} {int(v)}\n".encode())
        for k, t in tensors.items():
            if t is None:
                continue
            data = _tensor_bytes(t)
            f.write(f"t {k} {len(data)}\n".encode())
            f.write(data)
            f.write(b"\n")
        f.write(b"end\n")


def read_out(path: Path) -> dict:
    data = path.read_bytes()
    out, pos = {}, 0

    def line():
        nonlocal pos
        end = data.index(b"\n", pos)
        s = data[pos:end].decode()
        pos = end + 1
        return s

    assert line() == "simt-case"
    while True:
        s = line()
        if s == "end":
            return out
        kind, name, word = s.split()
        if kind == "i":
            out[name] = int(word)
        else:
            n = int(word)
            out[name] = bytes(data[pos:pos + n])
            pos += n + 1


def run_cases(cases: list[tuple[str, dict, dict]]) -> list[dict]:
    """Run (op, ints, tensors) cases in one emulator process; returns each case's outputs (raw
    bytes per tensor, plus `status` and `launches`). A kernel the emulator or a sanitizer stops
    raises with its report."""
    exe = build()
    with tempfile.TemporaryDirectory(prefix="simt-cases-") as d:
        paths = []
        for i, (op, ints, tensors) in enumerate(cases):
            p = Path(d) / f"case{i}"
            write_case(p, op, ints, tensors)
            paths.append(p)
        r = subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True,
                           env={**os.environ, **ENV})
        if r.returncode != 0:
            raise RuntimeError(f"emulated kernels failed (exit {r.returncode}):\n{r.stderr[-8000:]}")
        return [read_out(Path(str(p) + ".out")) for p in paths]


def as_tensor(raw: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(shape).clone()
