"""The package as a user meets it: build_info, and the error when the native library is missing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spallm_ext


def test_build_info_reports_backends():
    info = spallm_ext.build_info()
    assert info["backends"][0] == "cpu"
    assert ("cuda" in info["backends"]) == info["cuda"]
    # The library was compiled against the torch that runs it (major.minor at least).
    assert info["torch_version"].split(".")[:2] == torch.__version__.split(".")[:2]
    if info["cuda"]:
        assert info["cuda_archs"]
    assert info["cuda_available"] == (info["cuda"] and torch.cuda.is_available())


def test_every_cuda_path_name_is_accepted_by_the_library():
    """kernels.PATHS and the library's list agree (in a CPU-only build too, where forcing is a no-op):
    a path added on one side only would make use_cuda_kernel refuse a documented name."""
    from spallm_ext import kernels
    previous = kernels.cuda_kernel()
    try:
        for name in kernels.PATHS:
            kernels.set_cuda_kernel(name)
        with pytest.raises(ValueError, match="kernel must be one of"):
            kernels.set_cuda_kernel("mma_fast")
    finally:
        kernels.set_cuda_kernel(previous)


def test_import_without_native_library_says_how_to_build(tmp_path):
    """A source tree without _C*.so must fail with one clear sentence, not an obscure ImportError."""
    src = Path(spallm_ext.__file__).parent
    dst = tmp_path / "spallm_ext"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import spallm_ext"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: spallm_ext's native library is not built")
    assert "pip install --no-build-isolation -e ." in last


def test_demo_runs_on_the_synthetic_mlp(capsys):
    from spallm_ext import demo

    assert demo.main(["--model", "mlp", "--dim", "64", "--tokens", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gate_proj" in out and "bits/weight" in out
