"""lsc: Learned Spectral Compression for PyTorch.

    q_net = lsc.spectral(model)                       # reparameterize in place
    loss = task_loss + lsc.quantization_loss(model)   # learn what each frequency is worth
    lsc.save(model, "model.lsc")                      # entropy-coded, exact, pickle-free
"""
from .convert import spectral
from .errors import LscError, LscFormatError
from .loss import bits_per_weight, quantization_loss, rate_estimate, report
from .qnet import QuantizationNetwork

__version__ = "0.1.0"
__all__ = ["spectral", "quantization_loss", "bits_per_weight", "rate_estimate", "report",
           "QuantizationNetwork", "LscError", "LscFormatError"]
