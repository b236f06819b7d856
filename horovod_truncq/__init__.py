"""horovod-truncq: truncated gradient quantizers for Horovod, with densely packed payloads.

    import horovod_truncq as htq
    q = htq.TNQSGD(bits=3)
    payload = q.encode(grad)                       # the uint8 bytes that travel
    approx = q.decode(payload, grad.shape, grad.dtype)
"""
from .packing import pack, packed_size, unpack
from .quantizers import NQSGD, QSGD, SCHEMES, TBQSGD, TNQSGD, TUQSGD, Quantizer


def __getattr__(name: str):
    # The Horovod-facing parts import horovod.torch; the codec alone does not need it.
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name in ("ExchangeCompressor", "Traffic", "TrafficCounter"):
        from . import compressor
        return getattr(compressor, name)
    if name == "AllgatherExchange":
        from .exchange import AllgatherExchange
        return AllgatherExchange
    raise AttributeError(f"module 'horovod_truncq' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["TUQSGD", "TNQSGD", "TBQSGD", "QSGD", "NQSGD", "Quantizer", "SCHEMES", "DistributedOptimizer",
           "ExchangeCompressor", "AllgatherExchange", "Traffic", "TrafficCounter",
           "pack", "unpack", "packed_size", "__version__"]
