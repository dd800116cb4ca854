"""Fine-tune a spectral model under DistributedDataParallel, then write one .lsc file.

    torchrun --nproc_per_node 2 examples/ddp_finetune.py              # gloo on CPU
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --steps 200  # NCCL when CUDA is available

Each rank trains on its own shard of the scikit-learn digits data. The model and
its shared quantization network are wrapped together in lsc.SpectralTrainingModule,
so DDP broadcasts and all-reduces both, and the rate term is computed inside the
DDP forward. Rank 0 writes the file; every rank then reads it back and checks that
it decodes to the model's eval-mode weights.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import lsc
from lsc.zoo import DigitsCNN, load_digits_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rate-weight", type=float, default=0.05)
    ap.add_argument("--out", default="digits_ddp.lsc")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # torchrun sets RANK / WORLD_SIZE / MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    # 1. the same starting model on every rank (DDP also broadcasts rank 0's at construction)
    torch.manual_seed(0)
    model = DigitsCNN().to(device)
    x_train, y_train, x_test, y_test = [t.to(device) for t in load_digits_split()]
    # (a real run would start from trained weights, e.g. lsc.zoo.train_digits_cnn())

    # 2. reparameterize, wrap model + q_net together, then DDP
    q_net = lsc.spectral(model, rate_weight=args.rate_weight)
    train_module = lsc.SpectralTrainingModule(model, q_net)
    ddp = DDP(train_module, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)  # model's and q_net's parameters, each once

    # 3. each rank sees its own shard of every global batch
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (world * args.batch,), generator=g)[rank::world].to(device)
        out, rate = ddp(x_train[idx])
        loss = F.cross_entropy(out, y_train[idx]) + rate
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            with torch.no_grad():
                bpw = lsc.bits_per_weight(model).item()
            print(f"step {step:4d}  task {float((loss - rate).detach()):.4f}  bits/weight {bpw:.3f}")

    # 4. rank 0 writes the file; the call is a barrier, so every rank can read it afterwards
    lsc.save_on_rank0(ddp, args.out)
    decoded = lsc.load(args.out)
    model.eval()
    with torch.no_grad():
        for entry in model._lsc.entries:
            assert torch.equal(decoded[entry.name].to(device), getattr(entry.module, entry.attr)), entry.name
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"rank {rank}: {args.out} ({os.path.getsize(args.out)} bytes) decodes to this rank's weights; "
          f"test accuracy {acc:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
