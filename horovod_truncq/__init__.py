"""horovod-truncq: truncated gradient quantizers with a bucketed two-phase exchange, for Horovod.

    import horovod_truncq as htq
    q = htq.TNQSGD(bits=3)
    payload = q.encode(grad)                       # the uint8 bytes that travel
    approx = q.decode(payload, grad.shape, grad.dtype)

Layers, each importing only those below it: the codec (quantizers.py and what it uses), the
transport interface (groups.py), the exchange (exchange.py), the state (state.py), the reducer
(reducer.py, staging.py), and the front ends (optimizer.py for Horovod, ddp.py for torch DDP). Only
the Horovod transport (horovod_group.py) and front end import Horovod; this package imports the
front ends on first use.
"""
import importlib

from .exchange import NodeAwareExchange, TwoPhaseExchange
from .packing import pack, packed_size, unpack
from .quantizers import NQSGD, QSGD, SCHEMES, TBQSGD, TNQSGD, TUQSGD, Quantizer
from .traffic import Traffic, TrafficCounter

__version__ = "0.2.0"


def _horovod_compression(quantizer: Quantizer):
    """Horovod's Compressor protocol for a quantizer given to hvd.DistributedOptimizer."""
    from .optimizer import compression_for
    return compression_for(quantizer)


Quantizer.horovod_adapter = _horovod_compression


def __getattr__(name: str):
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name == "ddp":  # imported here, not with `from . import`, which would ask this function again
        return importlib.import_module(".ddp", __name__)
    raise AttributeError(f"module 'horovod_truncq' has no attribute {name!r}")


__all__ = ["TUQSGD", "TNQSGD", "TBQSGD", "QSGD", "NQSGD", "Quantizer", "SCHEMES", "DistributedOptimizer",
           "TwoPhaseExchange", "NodeAwareExchange", "Traffic", "TrafficCounter", "pack", "unpack", "packed_size",
           "__version__"]
