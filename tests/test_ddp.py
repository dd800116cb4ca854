"""Distributed fine-tuning: DDP over gloo on CPU, 2 processes, loopback only.

One pair of worker processes (module fixture) trains a spectral model under
DistributedDataParallel(lsc.SpectralTrainingModule(model, q_net)), saves the .lsc
file from rank 0, and loads it back on every rank; the tests then compare against
a single process trained on the concatenated batches.
"""
from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import lsc
from lsc.distributed import SpectralTrainingModule, save_on_rank0, unwrap_spectral

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")

WORLD = 2
STEPS = 4
BATCH = 8
LR = 0.05
RATE_WEIGHT = 0.01


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


def make_model() -> tuple[nn.Module, lsc.QuantizationNetwork]:
    torch.manual_seed(0)
    # float64 keeps the DDP-vs-single-process difference (all-reduce summation order)
    # far below anything that could flip a rounding decision of the quantizer.
    model = Net().double()
    q_net = lsc.spectral(model, block_size=4, init_bits=6.0, rate_weight=RATE_WEIGHT, min_group_symbols=16)
    return model, q_net


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 2, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def train_step(module, opt, x, y):
    out, rate = module(x)
    loss = F.cross_entropy(out, y) + rate
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _worker(rank: int, port: int, outdir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        model, q_net = make_model()
        if rank == 1:  # a different start on rank 1: DDP's construction-time broadcast must fix it
            with torch.no_grad():
                for p in list(model.parameters()) + list(q_net.parameters()):
                    p.add_(0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(SpectralTrainingModule(model, q_net))
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
        for step in range(STEPS):
            train_step(ddp, opt, *batch(step, rank))
        torch.save({k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
                   os.path.join(outdir, f"state{rank}.pt"))
        path = os.path.join(outdir, "model.lsc")
        save_on_rank0(ddp, path)
        # every rank reads the file rank 0 wrote: as a state dict, into a plain model, into the spectral model
        plain = lsc.load(path)
        fresh = lsc.load(path, model=Net().double())
        model.eval()
        with torch.no_grad():
            own_eval = {e.name: getattr(e.module, e.attr).detach().clone() for e in model._lsc.entries}
        lsc.load(path, model=model)
        with torch.no_grad():
            reloaded = {e.name: getattr(e.module, e.attr).detach().clone() for e in model._lsc.entries}
        lsc.save(unwrap_spectral(ddp), os.path.join(outdir, f"own{rank}.lsc"))
        torch.save({"plain": dict(plain), "fresh": fresh.state_dict(), "own_eval": own_eval, "reloaded": reloaded},
                   os.path.join(outdir, f"decoded{rank}.pt"))
        for variant in ("fsdp1", "fsdp2"):
            _fsdp_run(variant, rank, outdir)
        dist.barrier()
        dist.destroy_process_group()
        open(os.path.join(outdir, f"ok{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(outdir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def make_fp32_model():
    torch.manual_seed(0)
    model = Net()  # FSDP flattens/shards one dtype: model and q_net (fp32) must agree
    return model, lsc.spectral(model, block_size=4, init_bits=6.0, rate_weight=RATE_WEIGHT, min_group_symbols=16)


def _fsdp_run(variant: str, rank: int, outdir: str) -> None:
    model, q_net = make_fp32_model()
    train = SpectralTrainingModule(model, q_net)
    if variant == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        wrapped = FSDP(train, device_id=torch.device("cpu"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # a CPU mesh named explicitly: by default fully_shard would move the model to a GPU where one exists
        wrapped = fully_shard(train, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=0.9)
    for step in range(2):
        x, y = batch(step, rank)
        train_step(wrapped, opt, x.float(), y)
    path = os.path.join(outdir, f"{variant}.lsc")
    save_on_rank0(wrapped, path)
    torch.save(dict(lsc.load(path)), os.path.join(outdir, f"{variant}_decoded{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp"))
    # fork (children inherit the imported torch: no 5-10 s re-import per rank); spawn where fork is
    # unavailable, or where CUDA is (autograd starts a thread per device type at the first backward, and
    # a child forked after that cannot run backward)
    import torch.nn.parallel  # noqa: F401  (DDP imports torch._dynamo lazily: do it once, before forking)
    import torch._dynamo  # noqa: F401
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_available()
    ctx = mp.get_context("fork" if fork else "spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, outdir)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.startswith("error")]
    assert not errors, "\n".join(errors)
    assert all(os.path.exists(os.path.join(outdir, f"ok{r}")) for r in range(WORLD)), \
        f"workers did not finish (exit codes {[p.exitcode for p in procs]})"
    return outdir


@pytest.fixture(scope="module")
def single_process_reference():
    model, q_net = make_model()
    module = SpectralTrainingModule(model, q_net)
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        xs, ys = zip(*(batch(step, r) for r in range(WORLD)))
        train_step(module, opt, torch.cat(xs), torch.cat(ys))
    return module


def _load(outdir, name):
    return torch.load(os.path.join(outdir, name), weights_only=True)


def test_ddp_matches_single_process_on_concatenated_batches(ddp_run, single_process_reference):
    ref = single_process_reference.state_dict()
    states = [_load(ddp_run, f"state{r}.pt") for r in range(WORLD)]
    assert set(states[0]) == set(ref)
    assert any(k.startswith("q_net.") for k in ref) and any(k.startswith("model._lsc_qnet.") for k in ref)
    for k, v in ref.items():
        for r in range(WORLD):
            assert states[r][k].dtype == v.dtype, k
            tol = dict(rtol=1e-9, atol=1e-10) if v.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)  # q_net is fp32
            torch.testing.assert_close(states[r][k], v, **tol, msg=lambda m: f"rank {r}: {k}: {m}")
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=lambda m: f"ranks differ: {k}: {m}")
    # training moved both the coefficients and q_net (so the comparison above is not vacuous)
    start = SpectralTrainingModule(*make_model()).state_dict()
    assert not torch.equal(start["q_net.mlp.4.weight"], ref["q_net.mlp.4.weight"])
    assert not torch.equal(start["model.fc1.parametrizations.weight.original"], ref["model.fc1.parametrizations.weight.original"])


def test_rank0_file_decodes_identically_on_every_rank(ddp_run, single_process_reference):
    dec = [_load(ddp_run, f"decoded{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        plain, fresh, own_eval, reloaded = dec[r]["plain"], dec[r]["fresh"], dec[r]["own_eval"], dec[r]["reloaded"]
        assert set(plain) == set(dec[0]["plain"]) == set(fresh)
        for k in plain:
            assert torch.equal(plain[k], dec[0]["plain"][k]), (r, k)  # same bits on every rank
            assert torch.equal(fresh[k], plain[k]), (r, k)
        for k in own_eval:  # the file holds exactly the model's eval-mode weights
            assert torch.equal(plain[k], own_eval[k]), (r, k)
            assert torch.equal(reloaded[k], own_eval[k]), (r, k)
    # and those weights are the single-process model's, to fp tolerance
    model = single_process_reference.model.eval()
    with torch.no_grad():
        for e in model._lsc.entries:
            torch.testing.assert_close(dec[0]["plain"][e.name], getattr(e.module, e.attr), rtol=1e-9, atol=1e-9)
    model.train()


def test_every_rank_writes_the_same_bytes(ddp_run):
    data = [open(os.path.join(ddp_run, n), "rb").read() for n in ("model.lsc", "own0.lsc", "own1.lsc")]
    assert data[0] == data[1] == data[2]


def test_wrapper_parameters_and_errors():
    model, q_net = make_model()
    module = SpectralTrainingModule(model, q_net)
    params = list(module.parameters())
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in q_net.parameters()} <= {id(p) for p in params}
    assert {id(p) for p in model.parameters()} <= {id(p) for p in params}
    out, rate = module(batch(0, 0)[0])
    assert out.shape == (BATCH, 3) and rate.dim() == 0 and rate.requires_grad
    torch.testing.assert_close(rate, lsc.quantization_loss(model))
    assert SpectralTrainingModule(model, compute_rate=False)(batch(0, 0)[0])[1] is None
    assert unwrap_spectral(module) is model
    other_model, other_q = make_model()
    with pytest.raises(lsc.LscError, match="q_net"):
        SpectralTrainingModule(model, other_q)
    with pytest.raises(lsc.LscError, match="spectral"):
        SpectralTrainingModule(Net())
    with pytest.raises(lsc.LscError, match="spectral"):
        unwrap_spectral(Net())


def test_every_entry_point_sees_through_the_training_wrapper(tmp_path):
    model, q_net = make_model()
    module = SpectralTrainingModule(model, q_net)
    assert lsc.save(module, tmp_path / "w.lsc") == lsc.save(model, tmp_path / "m.lsc")
    assert (tmp_path / "w.lsc").read_bytes() == (tmp_path / "m.lsc").read_bytes()
    assert [r["name"] for r in lsc.report(module, print_table=False)] == \
        [r["name"] for r in lsc.report(model, print_table=False)]
    assert lsc.RateController(module, target_bytes=1e4).numel == lsc.RateController(model, target_bytes=1e4).numel
    lsc.to_dense(module)
    assert not hasattr(model, "_lsc")


def test_a_spectral_submodule_named_model_is_not_taken_for_the_whole():
    class Head(nn.Module):  # an ordinary model whose backbone happens to be called "model"
        def __init__(self, backbone):
            super().__init__()
            self.model = backbone
            self.head = nn.Linear(3, 2)
    class Holder(nn.Module):  # nor one called "module" (only DDP / DataParallel's is a wrapper's)
        def __init__(self, backbone):
            super().__init__()
            self.module = backbone
            self.head = nn.Linear(3, 2)
    backbone, _ = make_model()
    for outer in (Head(backbone), Holder(backbone)):
        with pytest.raises(lsc.LscError, match="not a spectral model"):
            lsc.compress_weights(outer)  # saving only the backbone would silently drop the head


def test_save_on_rank0_without_process_group(tmp_path):
    model, q_net = make_model()
    path = tmp_path / "m.lsc"
    save_on_rank0(SpectralTrainingModule(model, q_net), path)
    lsc.save(model, tmp_path / "n.lsc")
    assert path.read_bytes() == (tmp_path / "n.lsc").read_bytes()


@pytest.mark.parametrize("variant", ["fsdp1", "fsdp2"])
def test_fsdp_single_unit_matches_single_process(ddp_run, variant):
    """FSDP (one unit around SpectralTrainingModule, CPU gloo): trains like one process; rank 0's file decodes everywhere."""
    model, q_net = make_fp32_model()
    module = SpectralTrainingModule(model, q_net)
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
    for step in range(2):
        xs, ys = zip(*(batch(step, r) for r in range(WORLD)))
        train_step(module, opt, torch.cat(xs).float(), torch.cat(ys))
    model.eval()
    dec = [_load(ddp_run, f"{variant}_decoded{r}.pt") for r in range(WORLD)]
    with torch.no_grad():
        ref = {e.name: getattr(e.module, e.attr) for e in model._lsc.entries}
    for k in dec[0]:
        assert torch.equal(dec[0][k], dec[1][k]), k
    for k, v in ref.items():
        torch.testing.assert_close(dec[0][k], v, rtol=1e-4, atol=1e-5)


def _accumulate_worker(port: int, outdir: str) -> None:
    """One process, DDP over gloo: two micro-batches' backward passes without no_sync, nothing stepped between."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        q_net = lsc.spectral(model, rate_weight=0.05)
        ddp = torch.nn.parallel.DistributedDataParallel(SpectralTrainingModule(model, q_net))
        xs = torch.randn(8, 16), torch.randn(8, 16)

        def micro(x):
            out, rate = ddp(x)
            (out.pow(2).mean() + rate).backward()
        grads = []
        for x in xs:  # each micro-batch alone
            for p in ddp.parameters():
                p.grad = None
            micro(x)
            grads.append([p.grad.clone() for p in q_net.parameters()])
        for p in ddp.parameters():
            p.grad = None
        for x in xs:  # accumulated: DDP copies the all-reduced gradients back in place after each backward
            micro(x)
        torch.save(dict(alone=grads, both=[p.grad.clone() for p in q_net.parameters()]), os.path.join(outdir, "acc.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_accumulation_keeps_every_micro_batchs_q_net_gradient(tmp_path):
    """DDP's in-place gradient copy after a backward is no clearing of the model's gradients."""
    import torch.nn.parallel  # noqa: F401  (before forking, as ddp_run does)
    import torch._dynamo  # noqa: F401
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_available()
    proc = mp.get_context("fork" if fork else "spawn").Process(target=_accumulate_worker, args=(_free_port(), str(tmp_path)))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 0
    got = torch.load(tmp_path / "acc.pt")
    for both, a, b in zip(got["both"], *got["alone"]):
        torch.testing.assert_close(both, a + b)
