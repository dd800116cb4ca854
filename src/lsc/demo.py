"""``lsc demo``: the README's main job, end to end, on bundled data.

1. train the digits CNN (~151k parameters) on sklearn's ``load_digits``;
2. ``lsc.spectral`` it and fine-tune with ``task loss + lsc.quantization_loss``
   for a bounded number of steps;
3. ``lsc.save`` the file, ``lsc.load`` it into a fresh ``DigitsCNN``;
4. print fp32 size, file size, ratio and test accuracy before / after.

Deterministic for a given seed (one CPU thread, seeded data order), and about a
minute on two CPU cores.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .atomic import check_writable

__all__ = ["run_demo", "train_base", "finetune", "DEMO_EPOCHS", "DEMO_STEPS", "DEMO_RATE_WEIGHT"]

DEMO_EPOCHS = 20          # plain training before compression
DEMO_STEPS = 1500         # fine-tuning steps with the rate loss
DEMO_TARGET_BYTES = 8000  # default size target: ~77x at no accuracy loss (6000: ~100x, about -0.5 points)
DEMO_RATE_WEIGHT = 0.3    # fixed weight of bits/weight against the task loss, when --rate-weight is given
DEMO_INIT_BITS = 6.0
DEMO_BLOCK = 8
BATCH = 64                # plain training
TUNE_BATCH = 128          # fine-tuning
LR = 1e-3                 # plain training
TUNE_LR = 3e-3            # coefficients while fine-tuning (one-cycle schedule)
QNET_LR = 1e-2
KD_WEIGHT, KD_T = 1.0, 2.0  # distillation from the fp32 model next to the labels


def _bar(total, desc, progress, unit="step"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=(None if progress is None else not progress),
                leave=False, dynamic_ncols=True)


def _batches(n: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            yield perm[i:i + BATCH]


def train_base(data, epochs: int, seed: int, progress=None):
    """The digits CNN trained like :func:`lsc.zoo.train_digits_cnn`, with a progress bar."""
    from .zoo import DigitsCNN
    x_tr, y_tr, _, _ = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x_tr) / BATCH)
    model.train()
    with _bar(steps, "training CNN", progress) as bar:
        batches = _batches(len(x_tr), gen)
        for _ in range(steps):
            idx = next(batches)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
    return model.eval()


def finetune(model, data, steps: int, seed: int, progress=None, controller=None, teacher_logits=None):
    """Fine-tune a spectral model on cross-entropy (+ distillation) + rate loss, one-cycle learning rates.

    With a :class:`lsc.RateController` the rate term is its Lagrangian loss (size target).
    """
    import lsc
    x_tr, y_tr, _, _ = data
    st = lsc.state.get_state(model)
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if p.requires_grad], "lr": TUNE_LR},
                            {"params": list(st.q_net.parameters()), "lr": QNET_LR}])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[TUNE_LR, QNET_LR], total_steps=steps, pct_start=0.1,
                                                anneal_strategy="cos", div_factor=10, final_div_factor=20)
    gen = torch.Generator().manual_seed(seed + 1)
    n = sum(p.numel() for p in (e.coefficients for e in st.entries))
    model.train()
    with _bar(steps, "fine-tuning", progress) as bar:
        perm, pos = torch.randperm(len(x_tr), generator=gen), 0
        for s in range(steps):
            if pos + TUNE_BATCH > len(perm):
                perm, pos = torch.randperm(len(x_tr), generator=gen), 0
            idx = perm[pos:pos + TUNE_BATCH]
            pos += TUNE_BATCH
            logits = model(x_tr[idx])
            ce = F.cross_entropy(logits, y_tr[idx])
            loss = ce
            if teacher_logits is not None:
                loss = loss + KD_WEIGHT * KD_T ** 2 * F.kl_div(F.log_softmax(logits / KD_T, -1),
                                                               F.log_softmax(teacher_logits[idx] / KD_T, -1),
                                                               log_target=True, reduction="batchmean")
            rate = controller.loss() if controller is not None else lsc.quantization_loss(model)
            loss = loss + rate
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if s % 10 == 0 or s == steps - 1:
                w = controller.weight if controller is not None else st.rate_weight
                bpw = float(rate.detach()) / w if w else float(lsc.bits_per_weight(model).detach())
                bar.set_postfix(ce=f"{float(ce.detach()):.3f}", est=f"{bpw * n / 8:,.0f} B")
    return model.eval()


def run_demo(out: str = "demo.lsc", steps: Optional[int] = None, rate_weight: Optional[float] = None,
             epochs: Optional[int] = None, seed: int = 0, progress: Optional[bool] = None, quiet: bool = False,
             target_bytes: Optional[float] = None) -> dict:
    """Run the demo; print a summary unless ``quiet``; return the numbers as a dict.

    ``target_bytes``: steer the rate weight during fine-tuning (:class:`lsc.RateController`)
    so that the file lands within 5% of this size.
    """
    import lsc
    from .zoo import DigitsCNN, evaluate, load_digits_split

    steps = DEMO_STEPS if steps is None else int(steps)
    if target_bytes is None and rate_weight is None:
        target_bytes = DEMO_TARGET_BYTES  # default: steer to a size; --rate-weight alone uses a fixed weight
    rate_weight = DEMO_RATE_WEIGHT if rate_weight is None else float(rate_weight)
    epochs = DEMO_EPOCHS if epochs is None else int(epochs)
    if steps < 1 or epochs < 1:
        raise lsc.LscError("--steps and --epochs must be at least 1")
    if target_bytes is not None and not (0 < float(target_bytes) < math.inf):
        raise lsc.LscError(f"--target-bytes {target_bytes:g}: must be a number of bytes > 0")  # before the training
    if not (0 <= rate_weight < math.inf):
        raise lsc.LscError(f"--rate-weight {rate_weight:g}: must be a finite number >= 0")
    check_writable(out)  # a typo in the output path costs no training
    say = (lambda *a: None) if quiet else print
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and bit-reproducible
    t0 = time.perf_counter()
    try:
        data = load_digits_split(seed)
        x_tr, y_tr, x_te, y_te = data
        say(f"digits: {len(x_tr)} training / {len(x_te)} test images (sklearn load_digits, 8x8)")
        model = train_base(data, epochs, seed, progress)
        before = evaluate(model, x_te, y_te)
        n = sum(p.numel() for p in model.parameters())
        fp32 = 4 * n
        t_train = time.perf_counter() - t0
        say(f"trained DigitsCNN ({n:,} parameters) for {epochs} epochs: test accuracy {before['accuracy']:.2%} "
            f"[{t_train:.0f} s]")

        with torch.no_grad():
            teacher_logits = model(x_tr)  # the fp32 model teaches the compressed one
        torch.manual_seed(seed)
        lsc.spectral(model, block_size=DEMO_BLOCK, init_bits=DEMO_INIT_BITS, rate_weight=rate_weight)
        t1 = time.perf_counter()
        ctrl = None
        if target_bytes is not None:
            ctrl = lsc.RateController(model, target_bytes=float(target_bytes), total_steps=steps, ramp=0.6)
        finetune(model, data, steps, seed, progress, ctrl, teacher_logits)
        if ctrl is not None:  # land on the target with the real encoder's byte count
            ctrl.finalize(measure=lambda m: len(lsc.codec.to_bytes(lsc.compress_weights(m))))
        tuned = evaluate(model, x_te, y_te)
        t_tune = time.perf_counter() - t1
        how = f"size target {target_bytes:,.0f} B" if ctrl is not None else f"rate weight {rate_weight:g}"
        say(f"fine-tuned with lsc.quantization_loss ({how}) for {steps} steps: "
            f"test accuracy {tuned['accuracy']:.2%} [{t_tune:.0f} s]")

        lsc.save(model, out)
        size = os.path.getsize(out)
        fresh = DigitsCNN()
        lsc.load(out, model=fresh)
        after = evaluate(fresh, x_te, y_te)
    finally:
        torch.set_num_threads(threads)
    total_s = time.perf_counter() - t0
    res = dict(params=n, fp32_bytes=fp32, file_bytes=size, ratio=fp32 / size, bits_per_weight=8 * size / n,
               acc_before=before["accuracy"], acc_after=after["accuracy"], acc_spectral=tuned["accuracy"],
               nll_before=before["nll"], nll_after=after["nll"], seconds=total_s, path=str(out),
               steps=steps, epochs=epochs, rate_weight=rate_weight, target_bytes=target_bytes)
    say(f"wrote {out} and reloaded it into a fresh DigitsCNN:")
    say(f"  fp32 size        {fp32:>10,} B")
    say(f"  file size        {size:>10,} B  ({8 * size / n:.3f} bits/weight)")
    say(f"  ratio            {fp32 / size:>10.1f}x")
    say(f"  accuracy before  {before['accuracy']:>10.2%}  (fp32)")
    say(f"  accuracy after   {after['accuracy']:>10.2%}  (decoded from {out}, "
        f"{100 * (after['accuracy'] - before['accuracy']):+.2f} points)")
    say(f"  time             {total_s:>10.0f} s")
    return res
