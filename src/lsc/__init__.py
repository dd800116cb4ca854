"""lsc: Learned Spectral Compression for PyTorch.

    q_net = lsc.spectral(model)                       # reparameterize in place
    loss = task_loss + lsc.quantization_loss(model)   # learn what each frequency is worth
    lsc.save(model, "model.lsc")                      # entropy-coded, exact, pickle-free
"""
from .codec import compress_weights, decompress_weights, file_info, load, save
from .convert import spectral
from .errors import LscError, LscFormatError
from .loss import bits_per_weight, quantization_loss, rate_estimate, report
from .qnet import QuantizationNetwork

__version__ = "0.1.0"
__all__ = ["spectral", "quantization_loss", "bits_per_weight", "rate_estimate", "report",
           "QuantizationNetwork", "LscError", "LscFormatError",
           "compress_weights", "decompress_weights", "save", "load", "file_info"]
from . import wavelets  # noqa: F401  registers transform="wavelet" (CDF 9/7) and "wavelet53" (LeGall 5/3)
from .buffers import choose_buffer_tolerance, decode_buffers, encode_buffers, quantize_buffers_
from .lowrank import factorize, fold_factored_state_dict
from .target import RateController
__all__ += ["factorize", "fold_factored_state_dict", "RateController", "encode_buffers", "decode_buffers",
            "quantize_buffers_", "choose_buffer_tolerance"]
from .posttraining import PostTrainingResult, compress_posttraining, load_checkpoint
__all__ += ["compress_posttraining", "PostTrainingResult", "load_checkpoint"]
from .distributed import SpectralTrainingModule, save_on_rank0, unwrap_spectral
__all__ += ["SpectralTrainingModule", "save_on_rank0", "unwrap_spectral"]
from .lazy import lazy_info, load_lazy, set_cache, track_decode_memory
__all__ += ["load_lazy", "lazy_info", "set_cache", "track_decode_memory"]
