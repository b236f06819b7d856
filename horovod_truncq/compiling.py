"""Run a pass over gradient memory compiled with torch.compile, or eagerly.

Tensor sizes are dynamic, so a pass compiles once per device type and combination of static
arguments (bit width, rule, grid), whatever the tensor sizes. Passes over fewer elements than
COMPILE_MIN_ELEMENTS (all rows of a call together) run eagerly: there the compilation costs more
than it saves. HOROVOD_TRUNCQ_COMPILE=0 runs
every pass eagerly. Where the compiler fails (no C++ compiler, no Triton, an inductor bug), that pass
runs eagerly from then on, with a logged warning, and the others stay compiled. Any other exception
is the caller's and propagates. Both paths compute the same codes bit for bit.

The processes of one machine compile one at a time (a file lock in inductor's cache folder, held
during each pass's first compiled call): the first fills inductor's on-disk cache and the others load
from it, rather than all ranks compiling the same passes at once on shared cores.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import types
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._prims_common import make_contiguous_strides_for
from torch._inductor.exc import CppCompileError, GPUTooOldForTriton, InvalidCxxCompiler, TritonMissing

log = logging.getLogger("horovod_truncq")

COMPILE_ENV = "HOROVOD_TRUNCQ_COMPILE"
# Passes over fewer elements run eagerly. The main job (8 ranks, a 0.1 M-parameter CNN: chunk passes
# of 80 K elements) took 0.22 s a step eagerly and 0.21 compiled, but its first step took 90 s to
# compile with an empty cache (31 s with a warm one): compiling pays only for large buckets.
COMPILE_MIN_ELEMENTS = 1 << 18
COMPILER_ERRORS = (BackendCompilerFailed, CppCompileError, InvalidCxxCompiler, TritonMissing, GPUTooOldForTriton)
# torch.compile's backend: inductor; tests swap in a counting backend to count compilations
backend: Union[str, Callable] = "inductor"

_failed: set[tuple[str, tuple]] = set()  # (pass, (device type, *static arguments)) that failed to compile

# Inductor's switches for eager CUDA's arithmetic: IEEE division (Triton's `/` is approximate), no
# fused multiply-adds and no flushing of subnormals. Without them a compiled pass can round a code
# or a sum differently from the eager pass and from the CPU. Their names vary between torch
# versions: each is set where this version has it. (With emulate_precision_casts, torch 2.14's
# inductor also points Triton at the CUDA toolkit's libdevice, for the whole process.)
_EAGER_CUDA_NUMERICS = ("emulate_precision_casts", "emulate_divison_rounding", "eager_numerics.division_rounding",
                        "eager_numerics.disable_ftz")


def compiling_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0"


def failed_passes() -> list[str]:
    """The passes whose compilation failed in this process, which run eagerly from then on."""
    return sorted(f"{name} on {key[0]} {dict(key[1:])}" for name, key in _failed)


def _own_table(tensor: object) -> object:
    """A table argument (levels, norms) in memory of its own, contiguous from offset 0: a table of one
    row sliced from a payload keeps the payload's row stride and offset, several rows are copied out,
    and a compiled pass guards on both. Tables are small; anything else is returned unchanged."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.storage_offset() == 0 and tensor.stride() == make_contiguous_strides_for(tensor.shape):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _mark_dynamic(args: tuple, dynamic_args: int) -> None:
    """The first dimension of every tensor is its rows, and dynamic: the exchange encodes 1 row in
    one call and several in the next. Dynamo specialises a size of 1, so one row compiles apart:
    traced size-obliviously instead, a pack pass first traced for one row ignored the rows' stride
    and wrote row 0's codes into every row of a later call (torch 2.14). The other
    dimensions of the first `dynamic_args` tensors are dynamic; those of the later ones (level
    tables) are static, and so is a later 1-D tensor (a table shared by all rows): without the mark,
    dynamo makes a table's size dynamic once it has seen two, and torch 2.11 then failed to compile
    the 8-bit search ("KeyError: 'unbacked_bindings'")."""
    for position, tensor in enumerate(args):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            continue
        for dim in range(tensor.dim()):
            if position < dynamic_args or (dim == 0 and tensor.dim() > 1):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
            else:
                torch._dynamo.mark_static(tensor, dim)


@contextlib.contextmanager
def _one_compiler_per_machine() -> Iterator[None]:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    folder = Path(cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "horovod_truncq.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


def _eager_cuda_numerics() -> dict[str, bool]:
    from torch._inductor import config
    known = config.get_config_copy()
    return {name: True for name in _EAGER_CUDA_NUMERICS if name in known}


class Kernel:
    """A pass that runs compiled for tensors of at least `min_elements` elements, eagerly otherwise.
    Keyword arguments are static: each combination compiles once, with the dimensions of the first
    `dynamic_args` tensor arguments dynamic. Every index a pass computes is in range by construction
    (codes are masked to their table's size), so inductor's bounds asserts are off."""

    def __init__(self, fn: Callable[..., Optional[torch.Tensor]], fuse_reads: bool = False,
                 scalar_when: Callable[[dict], bool] = lambda static: False,
                 min_elements: Optional[int] = None, dynamic_args: int = 1) -> None:
        self.fn = fn
        self.min_elements = min_elements  # None: COMPILE_MIN_ELEMENTS
        self.dynamic_args = dynamic_args
        self.scalar_when = scalar_when  # static arguments for which inductor's scalar CPU code is faster
        self.options = {"assert_indirect_indexing": False}
        if fuse_reads:
            # inductor writes out a pointwise result of many operations or reads (unpacking a code, a
            # level table) before it reduces or stores it: a sum over senders would write and read
            # 4 bytes per sender and element, a decode its whole result once more. Keep it in registers.
            self.options.update(realize_opcount_threshold=1000, realize_reads_threshold=64,
                                realize_acc_reads_threshold=64)
        self._compiled: dict[tuple, Callable[..., Optional[torch.Tensor]]] = {}  # by device type and statics
        self._called: set[tuple] = set()  # (key, one row) whose compiled pass has run in this process

    def _compile(self, device_type: str, static: dict) -> Callable[..., Optional[torch.Tensor]]:
        fn = self.fn

        def bound(*args):
            return fn(*args, **static)

        # Dynamo caches compiled graphs per code object: a code object of its own per pass and static
        # arguments keeps them from evicting each other.
        name = "_".join([fn.__name__, device_type, *(f"{key}{value}" for key, value in sorted(static.items()))])
        code = bound.__code__.replace(co_name=name)
        function = types.FunctionType(code, bound.__globals__, name, None, bound.__closure__)
        if backend != "inductor":
            return torch.compile(function, backend=backend)
        options = dict(self.options)
        if device_type == "cpu" and self.scalar_when(static):
            options["cpp.simdlen"] = 1
        if device_type == "cuda":
            # inductor's loop merging fails on the index arithmetic of 3-bit codes, which straddle
            # words ("argument is not comparable", torch 2.11); the passes are elementwise over
            # blocks and need no loop reordering
            options["loop_ordering_after_fusion"] = False
            options.update(_eager_cuda_numerics())
        return torch.compile(function, options=options)

    @torch.no_grad()  # one grad mode for every caller (backward hooks, optimizer step): one compilation
    def __call__(self, numel: int, *args, **static) -> Optional[torch.Tensor]:
        threshold = COMPILE_MIN_ELEMENTS if self.min_elements is None else self.min_elements
        if numel >= threshold and compiling_enabled():
            key = (args[0].device.type, *sorted(static.items()))
            if (self.fn.__name__, key) not in _failed:
                compiled = self._compiled.get(key) or self._compiled.setdefault(key, self._compile(key[0], static))
                args = (*args[:self.dynamic_args], *map(_own_table, args[self.dynamic_args:]))
                _mark_dynamic(args, self.dynamic_args)
                called = (key, args[0].shape[0] == 1)  # one row compiles apart (_mark_dynamic)
                try:
                    if called in self._called:
                        return compiled(*args)
                    with _one_compiler_per_machine():
                        result = compiled(*args)
                    self._called.add(called)
                    return result
                except COMPILER_ERRORS as error:
                    _failed.add((self.fn.__name__, key))
                    log.warning("horovod_truncq: torch.compile of %s on %s %s failed (%s: %s); this pass runs eagerly "
                                "from now on (slower, same results)", self.fn.__name__, key[0], static,
                                type(error).__name__, str(error).splitlines()[0][:200],
                                exc_info=log.isEnabledFor(logging.DEBUG))
        return self.fn(*args, **static)
