"""lsc: Learned Spectral Compression for PyTorch.

    q_net = lsc.spectral(model)                       # reparameterize in place
    loss = task_loss + lsc.quantization_loss(model)   # learn what each frequency is worth
    lsc.save(model, "model.lsc")                      # entropy-coded, exact, pickle-free
"""
from . import wavelets  # noqa: F401  registers transform="wavelet" (CDF 9/7) and "wavelet53" (LeGall 5/3)
from .buffers import choose_buffer_tolerance, decode_buffers, encode_buffers, quantize_buffers_
from .codec import compress_weights, decompress_weights, file_info, load, recode, save
from .convert import quantization_network, spectral
from .dense import to_dense
from .distributed import SpectralTrainingModule, save_on_rank0, unwrap_spectral
from .errors import LscError, LscFormatError
from .feedback import collect_hessians
from .lazy import lazy_info, load_lazy, set_cache, track_decode_memory
from .loss import bits_per_weight, quantization_loss, rate_estimate, report
from .lowrank import factorize, fold_factored_state_dict
from .posttraining import PostTrainingResult, compress_posttraining, load_checkpoint
from .qnet import QuantizationNetwork
from .quantizer import release_buffers
from .sensitivity import TensorSensitivity, allocate_error_bounds, measure_sensitivity, predicted_distortion
from .target import RateController

__version__ = "0.3.0"
__all__ = [
    # training
    "spectral", "quantization_network", "quantization_loss", "bits_per_weight", "rate_estimate", "report", "QuantizationNetwork",
    "RateController", "factorize", "release_buffers", "to_dense",
    # files
    "compress_weights", "decompress_weights", "save", "load", "file_info", "recode", "fold_factored_state_dict",
    "encode_buffers", "decode_buffers", "quantize_buffers_", "choose_buffer_tolerance",
    # post-training, inference, distributed
    "compress_posttraining", "PostTrainingResult", "load_checkpoint",
    "measure_sensitivity", "allocate_error_bounds", "predicted_distortion", "TensorSensitivity", "collect_hessians",
    "load_lazy", "lazy_info", "set_cache", "track_decode_memory",
    "SpectralTrainingModule", "save_on_rank0", "unwrap_spectral",
    # errors
    "LscError", "LscFormatError",
]
