"""A sketched weight plus a low-rank branch: y = x W^T + (x l1) l2 + b (SVDQuant / EoRA / LoRA style).

``LowRankSketchedLinear`` is a SketchedLinear (codes + LUT, same kernels, same save/adapter
machinery) with two more parameters, ``l1`` [in, rank] and ``l2`` [rank, out], computed by the
one op ``spallm.lut_linear_lowrank``. Three ways to initialise the pair (``init=``):

* ``"svd"`` (SVDQuant-style outlier absorption): W = L + R with L the best rank-r approximation
  of W (optionally of the *smoothed* weight W diag(s), see below); the branch holds L and only the
  residual R is sketched. Helps when W has a few large directions (outlier channels) that would
  otherwise stretch every LUT.
* ``"eora"`` (EoRA, training-free error compensation): sketch W, then fit the branch to the sketch
  error E = W - Ŵ in the eigenspace of the calibration activations: with H = Q Λ Q^T (the layer's
  input second moment), the rank-r truncation of E Q Λ^½ mapped back by Λ^-½ Q^T is the rank-r
  matrix minimising tr((E - l2^T l1^T) H (E - l2^T l1^T)^T), the layer's output error on the
  calibration inputs. Never worse than the plain sketch on that measure.
* ``"zeros"`` (two-tower baseline, QLoRA / LoftQ style): the plain sketch plus a LoRA adapter,
  l1 ~ U(-1/sqrt(in), 1/sqrt(in)) and l2 = 0, so the layer starts equal to the plain sketch.

Smoothing (``smooth_alpha``, SVDQuant's first step) migrates activation outliers into the weight
with per-input-channel scales s_j = a_j^alpha / max_i |W_ij|^(1 - alpha), a_j the RMS of input
channel j on the calibration data (sqrt of diag H), and takes the SVD of W diag(s). Here only the
weights are compressed (activations stay 16/32-bit), so smoothing changes exactly one thing: which
rank-r part the branch takes (the one that matters most for the outputs, rather than for the
weights). The scales are folded back at once (l1 <- diag(1/s) l1', residual R = W - l2^T l1^T in
the original space, sketched with the Hessian weighting), so no kernel ever sees them.

``trainable`` picks what trains: ``"lut"`` (the SpaLLM way: the branch is a frozen correction),
``"lowrank"`` (two towers: frozen sketch, trainable adapter) or ``"both"``. Default: "lowrank" for
init="zeros", "both" otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from . import ops
from .formats import pack_codes
from .nn import SketchedLinear
from .sketch import SketchConfig, hessian_sketch, lloyd_sketch, output_error

INITS = ("svd", "eora", "zeros")
TRAINABLE = ("lut", "lowrank", "both")


def default_trainable(init: str) -> str:
    return "lowrank" if init == "zeros" else "both"


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


class LowRankSketchedLinear(SketchedLinear):
    """y = x W^T + (x l1) l2 + b, W the sketch (codes + LUT) of SketchedLinear.

    * ``l1``: nn.Parameter [in_features, rank], ``l2``: nn.Parameter [rank, out_features], both in
      ``lowrank_dtype`` (fp32 by default: a master copy, like the LUT).
    * ``trainable``: "lut", "lowrank" or "both" (see set_trainable); codes are always frozen.
    * ``lowrank_init``: how the branch was initialised ("svd", "eora", "zeros"); ``init_info``: the
      figures the initialisation measured (relative errors, see lowrank_sketch).
    * Multi-adapter batches (spallm_ext.multi_adapter) switch only the LUTs; the branch is shared.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int = 4, groups_per_row: int = 1,
                 bias: bool = True, device=None, dtype: torch.dtype | None = None,
                 lut_dtype: torch.dtype = torch.float32, lowrank_dtype: torch.dtype = torch.float32,
                 trainable: str = "both", train_bias: bool = False):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r} (rank 0 is a plain SketchedLinear)")
        if lowrank_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"lowrank_dtype must be a floating dtype, got {lowrank_dtype}")
        _check_choice("trainable", trainable, TRAINABLE)
        super().__init__(in_features, out_features, bits=bits, groups_per_row=groups_per_row, bias=bias,
                         device=device, dtype=dtype, lut_dtype=lut_dtype, train_bias=train_bias)
        self.l1 = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=lowrank_dtype))
        self.l2 = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=lowrank_dtype))
        self.lowrank_init = "zeros"
        self.init_info: dict = {}
        self._reset_lowrank()
        self.set_trainable(trainable)

    @property
    def rank(self) -> int:
        return self.l1.shape[1]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "l1", None) is not None:   # SketchedLinear.__init__ calls this before l1 exists
            self._reset_lowrank()

    @torch.no_grad()
    def _reset_lowrank(self, seed: int | None = None) -> None:
        """LoRA's init: l1 ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), l2 = 0."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        l1 = torch.rand(self.l1.shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
        self.l1.copy_(l1)
        self.l2.zero_()

    def set_trainable(self, mode: str) -> "LowRankSketchedLinear":
        """"lut": only the LUT trains; "lowrank": only l1, l2; "both". The bias follows train_bias."""
        _check_choice("trainable", mode, TRAINABLE)
        self.trainable = mode
        self.lut.requires_grad_(mode in ("lut", "both"))
        self.l1.requires_grad_(mode in ("lowrank", "both"))
        self.l2.requires_grad_(mode in ("lowrank", "both"))
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter_index is not None:
            # A LUT stack chosen per token: SketchedLinear's path for the sketch, the shared branch
            # added beside it (unfused; lut_linear_lowrank takes one LUT).
            y = super().forward(x)
            acc = torch.float64 if y.dtype == torch.float64 else torch.float32
            branch = (x.to(acc) @ self.l1.to(acc)) @ self.l2.to(acc)
            return (y.to(acc) + branch).to(y.dtype)
        x, bias = self._inputs(x)
        return ops.lut_linear_lowrank(x, self.codes, self.lut, self.l1, self.l2, bias)

    @torch.no_grad()
    def lowrank_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The branch as a dense [out, in] matrix, (l1 l2)^T."""
        w = (self.l1.double() @ self.l2.double()).T
        return w.to(dtype or self.l1.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding the decoded sketch plus the merged branch. (``decode()`` is the
        sketch alone.)"""
        lin = super().to_linear(dtype)
        lin.weight.add_(self.lowrank_weight(lin.weight.dtype))
        return lin

    def storage_bytes(self, lut_dtype: torch.dtype | None = None, lowrank_dtype: torch.dtype | None = None) -> int:
        """Bytes of the sketch (codes + LUTs) plus the branch, rank * (in + out) values at their
        dtype (or `lowrank_dtype`)."""
        elem = torch.empty((), dtype=lowrank_dtype or self.l1.dtype).element_size()
        return super().storage_bytes(lut_dtype) + self.rank * (self.in_features + self.out_features) * elem

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, init={self.lowrank_init}, trainable={self.trainable}, "
                f"lowrank_dtype={str(self.l1.dtype).replace('torch.', '')}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, bits: int = 4, groups_per_row: int = 1, *,
                    init: str = "eora", hessian: Tensor | None = None, smooth_alpha: float | None = None,
                    config: SketchConfig | None = None, trainable: str | None = None,
                    lut_dtype: torch.dtype = torch.float32, lowrank_dtype: torch.dtype = torch.float32,
                    train_bias: bool = False, measure_direct: bool = False,
                    seed: int = 0) -> "LowRankSketchedLinear":
        """Sketch an nn.Linear into codes + LUT + rank-`rank` branch (see the module docstring
        for `init`). `hessian` [in, in] is the calibration Hessian proxy (2/N) sum x x^T: with it
        the sketch is Hessian-weighted (hessian_sketch with `config`'s settings) and the errors
        are output errors; without it the sketch is data-free Lloyd and "eora" reduces to an SVD
        of the sketch error. The figures land in ``module.init_info``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        res = lowrank_sketch(linear.weight.detach(), rank, bits, groups_per_row, init=init, hessian=hessian,
                             config=config, smooth_alpha=smooth_alpha, measure_direct=measure_direct, seed=seed)
        mod = cls(linear.in_features, linear.out_features, rank, bits=bits, groups_per_row=groups_per_row,
                  bias=linear.bias is not None, device=linear.weight.device,
                  dtype=None if linear.bias is None else linear.bias.dtype, lut_dtype=lut_dtype,
                  lowrank_dtype=lowrank_dtype, trainable=trainable or default_trainable(init),
                  train_bias=train_bias)
        with torch.no_grad():
            mod.codes.copy_(pack_codes(res.codes, bits))
            mod.lut.copy_(res.lut)
            mod.l1.copy_(res.l1)
            mod.l2.copy_(res.l2)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        mod.lowrank_init, mod.init_info = init, res.info
        return mod

    @classmethod
    def from_sketched(cls, sketched: SketchedLinear, rank: int, *, init: str = "zeros",
                      weight: Tensor | None = None, hessian: Tensor | None = None,
                      trainable: str | None = None, lowrank_dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> "LowRankSketchedLinear":
        """Add a branch to an existing sketch, keeping its codes and LUT: init="zeros" (a LoRA
        adapter over the frozen sketch) or init="eora" (needs the original dense `weight`
        [out, in]; `hessian` optional). "svd" re-sketches, so it goes through from_linear."""
        if not isinstance(sketched, SketchedLinear):
            raise TypeError(f"from_sketched expects a SketchedLinear, got {type(sketched).__name__}")
        if init not in ("zeros", "eora"):
            raise ValueError(f"from_sketched supports init='zeros' or 'eora', got {init!r} "
                             "(init='svd' sketches a residual: use from_linear)")
        _check_rank(rank, sketched.out_features, sketched.in_features)
        mod = cls(sketched.in_features, sketched.out_features, rank, bits=sketched.bits,
                  groups_per_row=sketched.groups_per_row, bias=sketched.bias is not None,
                  device=sketched.lut.device,
                  dtype=None if sketched.bias is None else sketched.bias.dtype, lut_dtype=sketched.lut.dtype,
                  lowrank_dtype=lowrank_dtype, trainable=trainable or default_trainable(init),
                  train_bias=sketched.bias is not None and sketched.bias.requires_grad)
        with torch.no_grad():
            mod.codes.copy_(sketched.codes)
            mod.lut.copy_(sketched.lut)
            if sketched.bias is not None:
                mod.bias.copy_(sketched.bias)
            if init == "zeros":
                mod._reset_lowrank(seed)
                mod.init_info = {}
            else:
                if weight is None:
                    raise ValueError("init='eora' needs the original dense `weight` [out, in] to fit the sketch error")
                w = weight.detach().to(device=mod.lut.device, dtype=torch.float32)
                if tuple(w.shape) != (mod.out_features, mod.in_features):
                    raise ValueError(f"weight has shape {tuple(w.shape)}, the sketch is "
                                     f"{(mod.out_features, mod.in_features)}")
                w_hat = sketched.decode(torch.float32)
                h = None if hessian is None else hessian.to(w.device, torch.float32)
                damping = SketchConfig().damping
                l1, l2 = eora_fit(w - w_hat, rank, h, damping)
                mod.l1.copy_(l1)
                mod.l2.copy_(l2)
                mod.init_info = {"rel_err_sketch": relative_error(w, w_hat, h),
                                 "rel_err": relative_error(w, w_hat + (l1 @ l2).T, h)}
        mod.lowrank_init = init
        return mod


# ---------------------------------------------------------------------------------------------
# Initialisations, as plain tensor functions (fp32, on the weight's device).
# ---------------------------------------------------------------------------------------------


@dataclass
class LowRankSketch:
    """codes [out, in] int64, lut [out, G, 2^b] fp32, l1 [in, rank], l2 [rank, out] fp32, and
    figures: relative output errors sqrt(tr(E H E^T) / tr(W H W^T)) (weight-space Frobenius
    without a Hessian)."""
    codes: Tensor
    lut: Tensor
    l1: Tensor
    l2: Tensor
    info: dict = field(default_factory=dict)


def relative_error(weight: Tensor, w_hat: Tensor, hessian: Tensor | None = None) -> float:
    """sqrt(tr(E H E^T) / tr(W H W^T)) with E = W - Ŵ: the relative output error on the calibration
    inputs (relative Frobenius error when hessian is None)."""
    if hessian is None:
        ref = float(weight.float().norm() ** 2)
        err = float((weight.float() - w_hat.float()).norm() ** 2)
    else:
        ref = output_error(weight, torch.zeros_like(weight), hessian)
        err = output_error(weight, w_hat, hessian)
    return math.sqrt(max(err, 0.0) / ref) if ref > 0 else math.sqrt(max(err, 0.0))


def _check_rank(rank: int, out_features: int, in_features: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(out_features, in_features):
        raise ValueError(f"rank ({rank}) must be at most min(out_features, in_features) = "
                         f"{min(out_features, in_features)}")


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A rank-r SVD U S V^T as (l1 = V sqrt(S), l2 = sqrt(S) U^T) so that (l1 l2)^T = U S V^T.
    The singular values are shared evenly, so l1 and l2 start on one scale (what training wants)."""
    root = s[:rank].clamp_min(0).sqrt()
    return (vh[:rank].T * root).contiguous(), (root[:, None] * u[:, :rank].T).contiguous()


def eora_fit(error: Tensor, rank: int, hessian: Tensor | None = None,
             damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """(l1 [in, rank], l2 [rank, out]) minimising tr((E - (l1 l2)^T) H (E - (l1 l2)^T)^T) for the
    sketch error E [out, in] (EoRA). With H + damping * mean(diag H) * I = Q Λ Q^T, the optimum is the
    rank-r truncation of E Q Λ^½ mapped back by Λ^-½ Q^T. Without H: the rank-r SVD of E."""
    e = error.to(torch.float32)
    if hessian is None:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return _split(u, s, vh, rank)
    h = hessian.to(device=e.device, dtype=torch.float32)
    h = h + damping * float(h.diagonal().mean()) * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    lam, q = torch.linalg.eigh(h)
    root = lam.clamp_min(float(lam.max()) * 1e-10).sqrt()
    u, s, vh = torch.linalg.svd((e @ q) * root, full_matrices=False)
    l1, l2 = _split(u, s, vh, rank)
    return (q @ (l1 / root[:, None])).contiguous(), l2


def smoothing_scales(weight: Tensor, hessian: Tensor, alpha: float) -> Tensor:
    """SmoothQuant/SVDQuant per-input-channel scales s_j = a_j^alpha / max_i |W_ij|^(1 - alpha), a_j
    the RMS of input channel j (sqrt of diag H), normalised to geometric mean 1. Dead channels
    (a_j = 0) and all-zero weight columns get s_j = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha must lie in [0, 1], got {alpha}")
    a = hessian.diagonal().to(torch.float32).clamp_min(0).sqrt()
    wmax = weight.abs().amax(0).to(torch.float32)
    ok = (a > 0) & (wmax > 0)
    s = torch.ones_like(a)
    s[ok] = a[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
    if ok.any():
        s[ok] = s[ok] / torch.exp(torch.log(s[ok]).mean())
    return s


def _sketch(weight: Tensor, bits: int, groups_per_row: int, hessian: Tensor | None,
            config: SketchConfig | None) -> tuple[Tensor, Tensor, dict]:
    """codes, lut and the sketcher's own figures: hessian_sketch with `config`'s settings when
    there is a Hessian, else data-free Lloyd."""
    if hessian is not None:
        cfg = replace(config or SketchConfig(), bits=bits, groups_per_row=groups_per_row)
        res = hessian_sketch(weight, hessian, cfg)
        return res.codes, res.lut, res.info
    codes, lut = lloyd_sketch(weight, bits, groups_per_row)
    return codes, lut, {}


def _dense(codes: Tensor, lut: Tensor) -> Tensor:
    n, k = codes.shape
    g = lut.shape[1]
    return lut.gather(2, codes.reshape(n, g, k // g)).reshape(n, k)


@torch.no_grad()
def lowrank_sketch(weight: Tensor, rank: int, bits: int = 4, groups_per_row: int = 1, *, init: str = "eora",
                   hessian: Tensor | None = None, config: SketchConfig | None = None,
                   smooth_alpha: float | None = None, measure_direct: bool = False,
                   seed: int = 0) -> LowRankSketch:
    """Sketch weight [out, in] with a rank-`rank` branch; see the module docstring for `init`.

    info holds relative output errors (see relative_error): ``rel_err`` of the final layer,
    ``rel_err_sketch`` of the sketch alone (for "svd": of the sketched residual without the
    branch), ``rel_err_lowrank`` of the branch alone ("svd"), and with ``measure_direct`` (one
    more sketch, "svd" only) ``rel_err_direct`` of a plain sketch of W at the same bits."""
    _check_choice("init", init, INITS)
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    _check_rank(rank, n, k)
    h = None if hessian is None else hessian.detach().to(device=w.device, dtype=torch.float32)
    if h is not None and tuple(h.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {(n, k)}, got {tuple(h.shape)}")
    if smooth_alpha is not None and init != "svd":
        raise ValueError("smooth_alpha applies to init='svd' only (it picks which part the SVD takes)")
    info: dict = {"init": init, "rank": rank}
    if init == "svd":
        s = None
        if smooth_alpha is not None:
            if h is None:
                raise ValueError("smoothing needs calibration statistics: pass hessian= with smooth_alpha=")
            s = smoothing_scales(w, h, smooth_alpha)
            info["smooth_alpha"] = float(smooth_alpha)
        u, sv, vh = torch.linalg.svd(w if s is None else w * s, full_matrices=False)
        l1, l2 = _split(u, sv, vh, rank)
        if s is not None:
            l1 = (l1 / s[:, None]).contiguous()      # fold the smoothing back: the branch sees x, not x / s
        low = (l1 @ l2).T
        codes, lut, sk_info = _sketch(w - low, bits, groups_per_row, h, config)
        w_hat = _dense(codes, lut)
        info["rel_err_lowrank"] = relative_error(w, low, h)
        info["rel_err_sketch"] = relative_error(w, w_hat, h)
        info["rel_err"] = relative_error(w, w_hat + low, h)
        if measure_direct:
            dc, dl, _ = _sketch(w, bits, groups_per_row, h, config)
            info["rel_err_direct"] = relative_error(w, _dense(dc, dl), h)
    else:
        codes, lut, sk_info = _sketch(w, bits, groups_per_row, h, config)
        w_hat = _dense(codes, lut)
        info["rel_err_sketch"] = relative_error(w, w_hat, h)
        if init == "eora":
            damping = (config or SketchConfig()).damping
            l1, l2 = eora_fit(w - w_hat, rank, h, damping)
            info["rel_err"] = relative_error(w, w_hat + (l1 @ l2).T, h)
        else:  # zeros: LoRA's init, the layer starts as the plain sketch
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(k)
            l1 = ((torch.rand(k, rank, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(w.device, torch.float32)
            l2 = torch.zeros(rank, n, device=w.device)
            info["rel_err"] = info["rel_err_sketch"]
    info["sketch"] = sk_info
    return LowRankSketch(codes=codes, lut=lut.contiguous(), l1=l1.contiguous(), l2=l2.contiguous(), info=info)
