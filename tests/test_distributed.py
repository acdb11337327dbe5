"""Data-parallel LUT training on CPU with two gloo processes: DDP (LUT grads all-reduced, uint8
codes buffers broadcast) and FSDP2 (fully_shard: LUTs sharded by rows, codes replicated). One
optimizer step on each rank's half of a batch must equal one single-process step on the whole
batch. The workers write what they hold to files that the test compares."""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spallm_ext
from spallm_ext import SketchedLinear

WORLD = 2
TIMEOUT_S = 90
LR = 0.5


class _Net(nn.Module):
    """Two sketched layers (one with a frozen bias) around a frozen LayerNorm."""

    def __init__(self):
        super().__init__()
        self.up = SketchedLinear(32, 48, bits=4, groups_per_row=2, bias=True)
        self.norm = nn.LayerNorm(48)
        self.down = SketchedLinear(48, 16, bits=3, groups_per_row=3, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


def _model(stacked: bool = False) -> _Net:
    torch.manual_seed(0)
    net = _Net()
    for name, p in net.named_parameters():   # LUT-only training
        p.requires_grad_(name.endswith(".lut"))
    if stacked:   # two adapters, the second a scaled copy of the first
        spallm_ext.stack_adapters(net, {"b": {f"{n}.lut": m.lut.detach() * 1.25
                                              for n, m in (("up", net.up), ("down", net.down))}})
        # stack_adapters moved requires_grad from each lut (not read inside use_adapters) to its
        # stack: DDP waits for a gradient of every parameter that requires one before reducing
        assert not net.up.lut.requires_grad and net.up.lut_stack.requires_grad
    return net


def _batch():
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, 5, 32, generator=gen), torch.randn(8, 5, 16, generator=gen)
    adapter = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])    # per sequence, for the stacked model
    return x, target, adapter


def _loss(net, x, target, adapter, stacked):
    if stacked:
        with spallm_ext.use_adapters(net, adapter):
            return (net(x) - target).square().mean()
    return (net(x) - target).square().mean()


def _sgd_step(net, x, target, adapter, stacked):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    _loss(net, x, target, adapter, stacked).backward()
    opt.step()
    return net


def _shard(rank, *tensors):
    return [t[rank * 8 // WORLD:(rank + 1) * 8 // WORLD] for t in tensors]


def _init(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(1)   # two ranks on a two-core machine


def _ddp_worker(rank, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, init_file)
    try:
        result = {}
        for stacked in (False, True):
            net = _model(stacked)
            if rank == 1:   # DDP must broadcast rank 0's uint8 codes buffers at construction
                with torch.no_grad():
                    net.up.codes.bitwise_not_()
            ddp = DDP(net)
            x, target, adapter = _shard(rank, *_batch())
            _sgd_step(ddp, x, target, adapter, stacked)
            result[stacked] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        torch.save(result, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, init_file)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        net = _model()
        for layer in (net.up, net.down):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        lut = net.up.lut
        info = {"lut_is_dtensor": isinstance(lut, DTensor), "local_lut_rows": lut.to_local().shape[0],
                "codes_type": type(net.up.codes).__name__, "codes_dtype": net.up.codes.dtype}
        x, target, adapter = _shard(rank, *_batch())
        _sgd_step(net, x, target, adapter, False)
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in net.state_dict().items()}
        torch.save({"info": info, "state": full}, os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path):
    """Run `worker(rank, init_file, out_dir)` on WORLD processes; fail (not hang) after TIMEOUT_S."""
    init_file = tmp_path / "rendezvous"   # a file store: no port to pick, nothing to collide with
    ctx = mp.start_processes(worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):   # raises with the worker's traceback when one fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{worker.__name__} did not finish within {TIMEOUT_S} s")


def _single_process_reference(stacked=False):
    x, target, adapter = _batch()
    return {k: v.detach() for k, v in _sgd_step(_model(stacked), x, target, adapter, stacked).state_dict().items()}


def _assert_state_matches(got, want, start, trained=".lut"):
    """`trained`: the suffix of the tensors that learn (with stacks, ``lut`` is not read)."""
    assert set(got) == set(want)
    for k in want:
        if k.endswith(trained):
            assert not torch.equal(want[k], start[k]), f"{k} did not train"
            # all-reduce sums in another order than one big batch: equal up to fp32 rounding
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], want[k]), f"frozen {k} differs"


def test_ddp_step_equals_single_process(tmp_path):
    _spawn(_ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    for stacked in (False, True):
        start = _model(stacked).state_dict()
        want = _single_process_reference(stacked)
        for r in range(WORLD):
            _assert_state_matches(ranks[r][stacked], want, start, ".lut_stack" if stacked else ".lut")
        for k, v in ranks[0][stacked].items():   # and the ranks agree bit for bit
            assert torch.equal(ranks[1][stacked][k], v), k
        # codes were corrupted on rank 1 before wrapping; DDP broadcast rank 0's
        assert torch.equal(ranks[1][stacked]["up.codes"], start["up.codes"])


def test_fsdp2_step_equals_single_process(tmp_path):
    _spawn(_fsdp_worker, tmp_path)
    start, want = _model().state_dict(), _single_process_reference()
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD)]
    for res in ranks:
        info = res["info"]
        assert info["lut_is_dtensor"] and info["local_lut_rows"] == 48 // WORLD   # LUT rows sharded
        assert info["codes_type"] == "Tensor" and info["codes_dtype"] == torch.uint8   # codes replicated
        _assert_state_matches(res["state"], want, start)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k
