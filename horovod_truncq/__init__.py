"""horovod-truncq: truncated gradient quantizers for Horovod, with densely packed payloads.

    import horovod_truncq as htq
    q = htq.TNQSGD(bits=3)
    payload = q.encode(grad)                       # the uint8 bytes that travel
    approx = q.decode(payload, grad.shape, grad.dtype)
"""
from .packing import pack, packed_size, unpack
from .quantizers import NQSGD, QSGD, SCHEMES, TBQSGD, TNQSGD, TUQSGD, Quantizer
from .traffic import Traffic, TrafficCounter


def __getattr__(name: str):
    # The Horovod-facing parts import horovod.torch; the codec alone does not need it.
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name == "ExchangeCompressor":
        from .compressor import ExchangeCompressor
        return ExchangeCompressor
    if name in ("AllgatherExchange", "TwoPhaseExchange", "NodeAwareExchange"):
        from . import exchange
        return getattr(exchange, name)
    raise AttributeError(f"module 'horovod_truncq' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["TUQSGD", "TNQSGD", "TBQSGD", "QSGD", "NQSGD", "Quantizer", "SCHEMES", "DistributedOptimizer",
           "ExchangeCompressor", "AllgatherExchange", "TwoPhaseExchange", "NodeAwareExchange", "Traffic", "TrafficCounter",
           "pack", "unpack", "packed_size", "__version__"]
