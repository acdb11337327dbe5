"""Thin driver for the CMake build (CMakeLists.txt is the one native build).

Environment knobs, in the flash-attn style:
  SPALLM_FORCE_CUDA=1   compile the CUDA kernels even if detection says no
  SPALLM_SKIP_CUDA=1    CPU-only build even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST  archs to build (default "8.0;9.0a;8.0+PTX": sm_80 and sm_90a code, plus
                        compute_80 PTX that newer GPUs (Blackwell) compile at load time)
  MAX_JOBS              parallel compile jobs
  SPALLM_BUILD_TYPE     CMake build type (default Release)
  SPALLM_CMAKE_ARGS     extra arguments for the CMake configure step

Install with `pip install --no-build-isolation .`: an isolated build env would pull a different
torch than the one the extension must link against.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _want_cuda() -> bool:
    if os.environ.get("SPALLM_SKIP_CUDA", "0") == "1":
        return False
    if os.environ.get("SPALLM_FORCE_CUDA", "0") == "1":
        return True
    import torch  # deliberately not torch.cuda.is_available(): build hosts rarely have a GPU

    return torch.version.cuda is not None and _nvcc() is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSPALLM_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPALLM_BUILD_TYPE', 'Release')}",
            f"-DSPALLM_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if cuda:
            nvcc = _nvcc()
            cuda_root = str(Path(nvcc).resolve().parent.parent)
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_root}",
                     f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}"]
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;8.0+PTX")
        args += shlex.split(os.environ.get("SPALLM_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"spallm_ext: building with CUDA={'on' if cuda else 'off'}", flush=True)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("spallm_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
