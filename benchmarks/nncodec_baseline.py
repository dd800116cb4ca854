"""NNCodec (Fraunhofer HHI's MPEG NNC / ISO 15938-17 reference codec) baseline.

NNCodec's package metadata pins torchvision, opencv, pandas, numpy<2, ...,
which it only uses for dataset helpers and training use cases.  We install it
with ``pip install --no-deps nncodec`` and stub whichever of those modules are
missing while importing it; the codec path (`nnc.compress`/`nnc.decompress`,
deepCABAC C++ extension) needs only numpy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import time
import types

import numpy as np
import torch

# Imported by nncodec only for datasets / training helpers we never call.
_OPTIONAL = ["torchvision", "torchvision.transforms", "torchvision.datasets",
             "cv2", "pandas", "h5py", "flwr", "wandb", "ptflops", "torchmetrics"]


class _Stub(types.ModuleType):
    """Module placeholder: any attribute is another placeholder."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")

    def __call__(self, *args, **kwargs):
        return _Stub(f"{self.__name__}()")

    def __mro_entries__(self, bases):
        return (object,)


_nnc = None


def load_nnc():
    """Import nncodec.nnc with stubs for missing optional modules; raise a
    clear ImportError if nncodec itself is not installed."""
    global _nnc
    if _nnc is not None:
        return _nnc
    if importlib.util.find_spec("nncodec") is None:
        raise ImportError("nncodec is not installed: run benchmarks/setup_bench_env.sh "
                          "(pip install --no-deps nncodec); see benchmarks/NNCODEC_STATUS.md")
    missing = {n.split(".")[0] for n in _OPTIONAL
               if n.split(".")[0] not in sys.modules
               and importlib.util.find_spec(n.split(".")[0]) is None}
    added = []
    for name in _OPTIONAL:
        if name.split(".")[0] not in missing:
            continue
        sys.modules[name] = _Stub(name)
        added.append(name)
    try:
        from nncodec import nnc
    finally:  # do not leak fake modules into the rest of the process
        for name in added:
            sys.modules.pop(name, None)
    _nnc = nnc
    return nnc


def nncodec(state_dict, qp: int = -38):
    """Encode a float state_dict with NNCodec at quantisation parameter `qp`
    (lower = finer; default -38 is NNCodec's own default).  Other NNCodec
    settings are its defaults (dependent quantisation on, nonweight_qp=-75).
    Returns (bytes, decoded state_dict, encode s, decode s)."""
    nnc = load_nnc()
    params = {k: v.detach().cpu().float().numpy().astype(np.float32)
              for k, v in state_dict.items() if v.is_floating_point()}
    rest = {k: v for k, v in state_dict.items() if not v.is_floating_point()}
    quiet = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        blob = nnc.compress(params, bitstream_path=None, qp=qp, return_bitstream=True)
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        dec = nnc.decompress(bytearray(blob))
    t2 = time.perf_counter()
    out = {k: torch.from_numpy(np.asarray(dec[k], dtype=np.float32).reshape(v.shape).copy())
           for k, v in state_dict.items() if k in params}
    out.update(rest)  # non-float buffers are not coded (none in our models)
    return len(blob), {k: out[k] for k in state_dict}, t1 - t0, t2 - t1
