"""The .lsc codec: entropy coding (constriction ANS), byte format, save/load."""
from .api import HEADER_KEY, compress_weights, decompress_weights, file_info, from_bytes, load, recode, save, to_bytes

__all__ = ["compress_weights", "decompress_weights", "save", "load", "file_info", "to_bytes", "from_bytes", "recode",
           "HEADER_KEY"]
