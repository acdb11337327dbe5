"""spallm_ext: SpaLLM / SketchTune sketched linear layers for PyTorch.

A sketched weight keeps one b-bit code per weight and a small lookup table (LUT) per
(row, column group): W[r, c] = lut[r, c // (in_features // groups_per_row), code[r, c]].
The codes are frozen, the LUTs train. See README.md.
"""
from __future__ import annotations

import glob
import os

import torch  # noqa: F401  (loads libtorch before the native library that links against it)

__version__ = "0.1.0"


def _load_native():
    try:
        from . import _C  # registers torch.ops.spallm.*
    except ImportError as e:
        here = os.path.dirname(__file__)
        if not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd")):
            raise ImportError(
                "spallm_ext's native library is not built: from the source tree run "
                "`pip install --no-build-isolation -e .` (torch must be installed first), see README.md"
            ) from None
        raise ImportError(
            f"spallm_ext's native library failed to load ({e}); it was probably built against another "
            f"torch than the installed {torch.__version__}: rebuild with `pip install --no-build-isolation -e .`"
        ) from None
    return _C


_C = _load_native()

from . import ops  # noqa: E402  (fake + autograd registrations)
from .formats import pack_codes, unpack_codes, from_official, to_official  # noqa: E402
from .nn import SketchedLinear  # noqa: E402
from .ops import lut_decode, lut_grad, lut_linear, lut_linear_dx, set_deterministic  # noqa: E402
from .sketch import register_sketcher, weighted_lloyd  # noqa: E402
from .sketch import SketchConfig, hessian_sketch  # noqa: E402
from .convert import SketchReport, sketch_model  # noqa: E402
from .adapters import (codes_hash, load_adapter, load_official, load_sketched, save_adapter,  # noqa: E402
                       save_sketched)
from .multi_adapter import (adapter_luts, adapter_names, save_stacked_adapter, stack_adapters,  # noqa: E402
                            unstack_adapters, use_adapters)
from .lowrank import LowRankSketchedLinear, lowrank_sketch  # noqa: E402
from .ops import lut_linear_lowrank  # noqa: E402
from . import tuning as _tuning  # noqa: E402

_tuning._apply_env()  # $SPALLM_EXT_TUNING: measured dispatch thresholds (spallm_ext/tuning.py)


def build_info() -> dict:
    """Which backends this build of spallm_ext has, for which archs, built with which versions."""
    info = dict(_C.build_info())
    info["version"] = __version__
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    info["backends"] = ["cpu"] + (["cuda"] if info["cuda"] else [])
    return info


__all__ = [
    "SketchConfig",
    "SketchReport",
    "SketchedLinear",
    "build_info",
    "codes_hash",
    "hessian_sketch",
    "load_adapter",
    "load_official",
    "load_sketched",
    "save_adapter",
    "save_sketched",
    "set_deterministic",
    "sketch_model",
    "from_official",
    "lut_decode",
    "lut_grad",
    "lut_linear",
    "lut_linear_dx",
    "pack_codes",
    "register_sketcher",
    "to_official",
    "unpack_codes",
    "weighted_lloyd",
    "adapter_luts",
    "adapter_names",
    "save_stacked_adapter",
    "stack_adapters",
    "unstack_adapters",
    "use_adapters",
    "LowRankSketchedLinear",
    "lowrank_sketch",
    "lut_linear_lowrank",
]
