"""Small models of every module type lsc must handle, shared by the test modules."""
import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, as in language models

    def forward(self, idx):
        return self.head(torch.tanh(self.body(self.emb(idx))))


class HighRank(nn.Module):
    def __init__(self, rank=10):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*([2] * (rank - 1)), 3))
        self.scale = nn.Parameter(torch.tensor(1.5))  # 0-D parameter

    def forward(self, x):
        return x * self.w.sum() * self.scale


class RNNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 5, batch_first=True)

    def forward(self, x):
        return self.gru(self.lstm(x)[0])[0]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.mha(x, x, x, need_weights=False)[0] + x)


def cases():
    """(name, model factory, input factory) for every supported module type."""
    return [
        ("linear", lambda: nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3)), lambda: torch.randn(4, 12)),
        ("conv1d", lambda: nn.Conv1d(3, 6, 5), lambda: torch.randn(2, 3, 16)),
        ("conv2d_bn", lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval(), lambda: torch.randn(2, 3, 9, 9)),
        ("conv3d", lambda: nn.Conv3d(2, 4, 3), lambda: torch.randn(1, 2, 6, 6, 6)),
        ("conv_transpose", lambda: nn.ConvTranspose2d(4, 3, 3, stride=2), lambda: torch.randn(2, 4, 5, 5)),
        ("embedding", lambda: nn.Embedding(30, 12), lambda: torch.randint(0, 30, (3, 7))),
        ("rnns", RNNs, lambda: torch.randn(2, 5, 6)),
        ("attention_layernorm", Attention, lambda: torch.randn(2, 5, 16)),
        ("tied", Tied, lambda: torch.randint(0, 50, (2, 6))),
        ("rank10_and_scalar", HighRank, lambda: torch.randn(3)),
    ]


def first_output(out):
    """The tensor a model returned (RNNs and attention return tuples)."""
    return out[0] if isinstance(out, tuple) else out


def fine_tune(model, q_net, x, steps=3, lr=1e-2):
    """A few Adam steps of a spectral model on ``mean(output^2) + quantization_loss``: the coefficients,
    statistics and q_net all move, as in real training."""
    import lsc
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=lr)
    model.train()
    for _ in range(steps):
        loss = first_output(model(x)).float().pow(2).mean() + lsc.quantization_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def tiny_bert_config(vocab_size=120, layers=1):
    """A Hugging Face BertConfig small enough for a unit test (hidden 32, 2 heads); skips without transformers."""
    import pytest
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)


def spectral_tiny_bert(init_bits=5):
    """(a spectral BertModel of :func:`tiny_bert_config` in eval mode, a batch of its input ids)."""
    cfg = tiny_bert_config()  # skips without transformers
    import transformers

    import lsc
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    lsc.spectral(model, init_bits=init_bits)
    return model.eval(), torch.randint(0, cfg.vocab_size, (2, 9))
