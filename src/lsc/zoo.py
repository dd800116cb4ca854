"""Small reference models for demos, tests and benchmarks.

The digits CNN trains in seconds on a CPU from data bundled with scikit-learn,
so examples and benchmarks can compare compressors on a real trained model
without downloading anything.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

__all__ = ["DigitsCNN", "load_digits_split", "train_classifier", "train_digits_cnn", "evaluate"]


class DigitsCNN(nn.Module):
    """CNN for 8x8 digits with ~151k parameters.

    Sized to match the competitor figures we benchmark against; most of the
    parameters sit in the first Linear layer, like many real classifiers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_digits_split(seed: int = 0):
    """Stratified 80/20 split of sklearn digits as float32 (N,1,8,8) in [0,1].

    A fixed seed keeps accuracy numbers comparable across runs and machines.
    Returns (x_train, y_train, x_test, y_test); labels are int64.
    """
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr),
            torch.from_numpy(x_te), torch.from_numpy(y_te))


def train_digits_cnn(epochs: int = 30, seed: int = 0, lr: float = 1e-3,
                     batch_size: int = 64) -> DigitsCNN:
    """Train DigitsCNN with Adam, deterministically for a given seed.

    Seeds both the initialisation and the shuffling so that benchmark inputs
    are reproducible; 30 epochs reach ~98-99% test accuracy in a few seconds.
    """
    data = load_digits_split(seed)
    torch.manual_seed(seed)
    return train_classifier(DigitsCNN(), data, epochs, lr=lr, batch_size=batch_size, seed=seed)


def train_classifier(model: nn.Module, data, epochs: int, *, extra_params=(), extra_loss=None,
                     lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy over shuffled mini-batches of ``data`` (a :func:`load_digits_split` tuple).

    ``extra_params`` (e.g. lsc's q_net) are optimized too, and ``extra_loss()`` (e.g.
    ``RateController.loss``) is added to every batch's loss. Returns the model in eval mode.
    """
    x_tr, y_tr = data[0], data[1]
    opt = torch.optim.Adam(list(model.parameters()) + list(extra_params), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Test accuracy and mean negative log-likelihood (nats) of a classifier.

    NLL is reported next to accuracy because it moves before accuracy does,
    which makes small compression damage visible.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    return {"accuracy": (logits.argmax(1) == y).float().mean().item(), "nll": F.cross_entropy(logits, y).item()}
