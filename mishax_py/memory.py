"""Keep freed activation memory inside the process, so repeated caching runs don't page-fault.

A forward that caches every site retains hundreds of MB of intermediates (about 550 MB
for 12 layers × d_model 768 at batch 4 × 128 tokens) that the plain forward would have
freed and reused at once. With glibc's default settings, freeing such a cache hands the
memory back to the kernel (``munmap`` / heap trimming), and the next run's cache has to
fault every page in again: measured here, ~85k minor faults and ~0.5 s of kernel time
per forward on that config, which is most of the cost of caching.

:func:`reserve_for` raises glibc's trim threshold to the size of the caches actually
seen (capped at a quarter of physical memory) and keeps allocations up to 32 MiB on
the heap, so a freed cache is reused by the next one, the way PyTorch's CUDA caching
allocator keeps GPU memory. ``InstrumentedModel.run_with_cache`` calls it for CPU
caches. It does nothing on other C libraries, and nothing once disabled with
``keep_freed_memory(False)`` or the environment variable
``MISHAX_PY_KEEP_FREED_MEMORY=0``. The process's resident size then stays at its
peak instead of shrinking between runs (bounded by the cap).

Memory estimates and budgets
----------------------------
Runs, sweeps and activation patching estimate the memory of their largest indivisible step (one
forward of the smallest chunk they can make) before allocating anything, and fail at once with a
:class:`MemoryBudgetError` (a ``MemoryError``) naming the estimate, the budget and what to reduce,
instead of allocating for minutes until the allocator gives up.

* :func:`estimate_forward_bytes` is the one estimator of a forward pass (its formula is in its
  docstring); it returns a :class:`MemoryEstimate`, bytes by part, which callers extend with
  what they hold besides (a cache, kept logits, an earlier run's results): ``est.plus(cache=n)``.
  :func:`cache_bytes` is the exact size of caching some sites. Sweeps and the packed patching
  engine size their chunks from the same estimator (``default_batch_size``, ``default_rows``).
* :func:`memory_budget` is what one step may use: ``max_memory=`` where the caller passes it
  (``im.run``, ``im.run_with_cache``, ``im.sweep``, ``activation_patching``), else the process-wide
  setting (:func:`set_max_memory`, or the environment variable ``MISHAX_PY_MAX_MEMORY``, e.g.
  ``"8GiB"``), else :data:`BUDGET_SHARE` of the available RAM on the CPU (``MemAvailable``,
  and the cgroup's limit where one is set) or of the free device memory on CUDA (the driver's free
  memory plus what PyTorch's caching allocator holds unused).
* :func:`check_fits` raises when an estimate exceeds a budget; :func:`check_budget` is what entry
  points call: below :data:`CHECK_FLOOR` with an automatic budget it does not even read the
  budget, so small runs cost nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from mishax_py.devices import execution_device, model_dtype

if TYPE_CHECKING:
    from mishax_py.family import ModelDims
    from mishax_py.instrumented import InstrumentedModel
    from mishax_py.sites import SiteCatalogue

__all__ = [
    "BUDGET_SHARE",
    "CHECK_FLOOR",
    "MemoryBudgetError",
    "MemoryChunkingWarning",
    "MemoryEstimate",
    "announce_chunking",
    "available_ram",
    "cache_bytes",
    "check_budget",
    "check_estimate",
    "check_fits",
    "checked",
    "estimate_forward_bytes",
    "estimate_memory",
    "estimate_run",
    "fit_chunk",
    "format_bytes",
    "get_max_memory",
    "is_supported",
    "keep_freed_memory",
    "memory_budget",
    "model_device",
    "parse_bytes",
    "register_estimator",
    "reserve_for",
    "rows_and_positions",
    "set_max_memory",
    "study_estimate",
]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit

_enabled = os.environ.get("MISHAX_PY_KEEP_FREED_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off")
_reserved = 0  # bytes the trim threshold is currently set to (0: untouched)
_libc: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: not glibc


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        _libc = False
        name = ctypes.util.find_library("c")
        if name:
            try:
                lib = ctypes.CDLL(name)
                if hasattr(lib, "gnu_get_libc_version") and hasattr(lib, "mallopt"):
                    _libc = lib
            except OSError:
                pass
    return _libc if isinstance(_libc, ctypes.CDLL) else None


def _cap() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * 1024**3


def is_supported() -> bool:
    """Whether :func:`reserve_for` can act in this process (its C library is glibc)."""
    return _glibc() is not None


def keep_freed_memory(enabled: bool = True) -> None:
    """Turn :func:`reserve_for` on or off for this process (settings already made stay)."""
    global _enabled
    _enabled = bool(enabled)


def reserve_for(nbytes: int) -> bool:
    """Let the process keep at least ``nbytes`` of freed heap for reuse. Returns whether a setting changed.

    Cheap to call after every run: it only calls into libc when ``nbytes`` exceeds what is
    already reserved (the threshold grows to twice the largest cache seen, up to the cap).
    """
    global _reserved
    if not _enabled or nbytes <= _reserved:
        return False
    lib = _glibc()
    if lib is None:
        return False
    target = min(max(2 * int(nbytes), 64 * 1024 * 1024), _cap())
    if target <= _reserved:
        return False
    _reserved = target  # also on failure: don't retry on every run
    ok = lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return lib.mallopt(_M_TRIM_THRESHOLD, min(target, 2**31 - 1)) == 1 and ok


def available_ram() -> int:
    """Bytes of RAM available to this process now: ``MemAvailable``, or less where a cgroup limit leaves less
    (``memory.max - memory.current``, cgroup v2 or v1); 2 GiB when nothing can be read."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2 << 30
    limit = _cgroup_headroom()
    return min(avail, limit) if limit is not None else avail


def _cgroup_headroom() -> int | None:
    """``limit - usage`` of this process's memory cgroup (``None`` without a limit)."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
            limit = int(raw)
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1's "no limit"
            return None
        return max(limit - usage, 0)
    return None


# -- estimates and budgets ------------------------------------------------------------------------------

#: The share of the available RAM (CPU) or free device memory (CUDA) that one step may use by default.
BUDGET_SHARE = 0.9
#: Estimates below this are not checked against an automatic budget (the check would only cost time).
CHECK_FLOOR = 64 << 20

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value: int | float | str) -> int:
    """A byte count from an int or a string such as ``"512MiB"``, ``"8 GiB"``, ``"2.5GB"`` or ``"1e9"``."""
    if isinstance(value, bool):
        raise TypeError("max_memory must be a number of bytes or a string such as '8GiB', got a bool")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a memory size; write e.g. 512MiB, 8GiB or 2e9 (bytes)")
        try:
            n = float(m.group(1)) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"cannot read {value!r} as a memory size; write e.g. 512MiB, 8GiB or 2e9") from None
    else:
        raise TypeError(f"max_memory must be a number of bytes or a string such as '8GiB', got {type(value).__name__}")
    if not n > 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(n)


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``640.0 MiB``, ``12.0 KiB``, ``512 B``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_max_memory: int | None = None
_env_max = os.environ.get("MISHAX_PY_MAX_MEMORY", "").strip()
if _env_max:
    _max_memory = parse_bytes(_env_max)


def set_max_memory(value: int | str | None) -> None:
    """The process-wide memory budget of one step (bytes or ``"8GiB"``; ``None``: automatic, see the module docs).

    A ``max_memory=`` argument overrides it for one call. The environment variable
    ``MISHAX_PY_MAX_MEMORY`` sets it at import.
    """
    global _max_memory
    _max_memory = None if value is None else parse_bytes(value)


def get_max_memory() -> int | None:
    """The process-wide budget set by :func:`set_max_memory` or ``MISHAX_PY_MAX_MEMORY`` (``None``: automatic)."""
    return _max_memory


class MemoryBudgetError(MemoryError):
    """A step would need more memory than its budget allows; raised before anything is allocated.

    Attributes: ``estimate`` (a :class:`MemoryEstimate`), ``budget`` (bytes), ``what`` (the step).
    """

    def __init__(self, message: str, estimate: MemoryEstimate, budget: int, what: str) -> None:
        super().__init__(message)
        self.estimate, self.budget, self.what = estimate, budget, what


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimate of the peak bytes of one step, by part (e.g. ``{"logits": ..., "cache": ...}``).

    ``total`` is the sum of the parts. Estimates compose: ``a + b`` adds parts of the same name,
    ``est.plus(cache=n)`` adds named parts. ``int(est)`` is the total.
    """

    parts: Mapping[str, int] = field(default_factory=dict)
    #: the step the estimate is of (``"attribution_patching (its target forward and backward ...)"``); set by
    #: :func:`estimate_memory`'s estimators, empty for a bare forward.
    what: str = ""
    #: the chunk sizes the study chose to fit its budget (e.g. ``{"batch_size": 32}``); empty when it does not chunk.
    chunks: Mapping[str, int] = field(default_factory=dict)
    #: the budget (bytes) the chunk sizes were chosen for; ``None`` when none was read.
    budget: int | None = None

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def fits(self) -> bool:
        """Whether ``total`` is within ``budget`` (``True`` when no budget was read)."""
        return self.budget is None or self.total <= self.budget

    def plus(self, **parts: int) -> MemoryEstimate:
        """This estimate with ``parts`` added (bytes; parts of an existing name are summed)."""
        return self + MemoryEstimate({k: int(v) for k, v in parts.items()})

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        merged = dict(self.parts)
        for k, v in other.parts.items():
            merged[k] = merged.get(k, 0) + int(v)
        return replace(self, parts=merged)

    def __int__(self) -> int:
        return self.total

    def describe(self) -> str:
        """``"1.2 GiB (working 0.9 GiB, cache 0.3 GiB)"``: the total and its largest parts."""
        shown = sorted(((v, k) for k, v in self.parts.items() if v > 0), reverse=True)
        inner = ", ".join(f"{k} {format_bytes(v)}" for v, k in shown)
        return f"{format_bytes(self.total)}" + (f" ({inner})" if inner else "")


def estimate_forward_bytes(dims: ModelDims, rows: int, pos: int, *, grad: bool = False, keep_logits: bool = False,
                           dtype_bytes: int = 4, kv_len: int = 0) -> MemoryEstimate:
    """The peak memory of one forward of ``rows`` sequences of ``pos`` new positions (after ``kv_len`` cached ones).

    An upper-ish bound: each term is the largest set of tensors alive at one time, and ``4`` bytes are
    counted wherever models compute in fp32 whatever their dtype (the attention softmax); the logits and their
    soft-cap are computed in the model's dtype (``e``; measured on a bf16 Gemma-2-2B-shaped model,
    ``benchmarks/scale.py``).
    With ``R = rows``, ``P = pos``, ``K = kv_len + pos`` keys, ``e = dtype_bytes`` and the sizes of
    ``dims`` (``d = d_model``, ``V = vocab``, ``H = n_heads``, ``L = n_layers``):

    * ``working`` = ``(8·e + 4·4)·R·P·d`` of residual-stream tensors and fp32 norm temporaries, plus the
      largest transient of one layer: ``max(2·R·P·V·e, 4·R·P·d_mlp·e, R·H·P·K·(e + 4) + 2·R·P·(H + 2·H_kv)·d_head·e)``
      (the logits and one soft-cap temporary -- each step of the soft-cap frees its input; the MLP's gate,
      activation, up and product; eager
      attention's map in the model's dtype and its fp32 softmax -- each step of the scale, soft-cap, mask,
      softmax chain frees its input once its output exists, so two maps are alive at a time -- with the
      queries, keys and values before and after RoPE). The returned logits are inside this peak;
    * ``masks`` = ``2·R·P·K·e``: the 4-D attention masks (one per layer type: full, sliding);
    * ``kv`` = ``2·L·R·kv_len·H_kv·d_head·e`` when ``kv_len > 0`` (the cached keys and values attended to);
    * ``autograd`` (``grad=True``) = ``L·R·P·((12·d + 4·d_mlp)·e + 3·H·K·4) + R·P·V·e``: what
      backward keeps of every layer (norm inputs, projections, the attention maps in fp32, the MLP)
      and of the logits (the soft-cap's ``tanh``); and ``backward`` = ``R·P·V·e``: the logits' gradient,
      alive at the start of the backward pass on top of what it keeps;
    * ``logits`` (``keep_logits``) = ``R·P·V·e``: logits held *after* the forward while later steps run
      (a sweep's results).

    Measured against the peak resident memory (``VmHWM``) of fp32 forwards on CPU (glibc's mmap threshold
    fixed, so the peak is that of the live tensors), with and without autograd and caching every site, on
    models dominated in turn by attention maps, the vocabulary, the MLP and the residual stream: 1.05-1.75
    times the measurement (``tests/mishax_py/test_memory.py`` checks that it stays above it); on the studies
    of ``benchmarks/scale.py`` and its bf16 Gemma-2-2B-shaped model, see ``benchmarks/RESULTS.md``.
    """
    R, P, K, e, f = int(rows), int(pos), int(kv_len) + int(pos), int(dtype_bytes), 4
    d, d_mlp, V, H, L = dims.d_model, dims.d_mlp, dims.vocab, dims.n_heads, dims.n_layers
    H_kv, d_head = dims.n_kv_heads, dims.d_head
    transient = max(2 * R * P * V * e, 4 * R * P * d_mlp * e,
                    R * H * P * K * (e + f) + 2 * R * P * (H + 2 * H_kv) * d_head * e)
    parts = {
        "working": (8 * e + 4 * f) * R * P * d + transient,
        "masks": 2 * R * P * K * e,
    }
    if kv_len:
        parts["kv"] = 2 * L * R * int(kv_len) * H_kv * d_head * e
    if grad:
        parts["autograd"] = L * R * P * ((12 * d + 4 * d_mlp) * e + 3 * H * K * f) + R * P * V * e
        parts["backward"] = R * P * V * e
    if keep_logits:
        parts["logits"] = R * P * V * e
    return MemoryEstimate(parts)


# per catalogue: {site names: {(batch power, pos power): bytes}}, so a caching run's size is a few multiplications
_CACHE_COEFFS: weakref.WeakKeyDictionary[SiteCatalogue, dict[tuple[str, ...], dict[tuple[int, int], int]]] = (
    weakref.WeakKeyDictionary())


def cache_bytes(im: InstrumentedModel, names: Sequence[str], rows: int, pos: int) -> int:
    """The exact bytes of caching sites ``names`` (canonical) for ``rows`` sequences of ``pos`` positions."""
    key = tuple(names)
    per_cat = _CACHE_COEFFS.setdefault(im.catalogue, {})
    coeffs = per_cat.get(key)
    if coeffs is None:
        coeffs = {}
        for name in key:
            info = im.site_info(name)
            const, nb, npos = torch.tensor([], dtype=info.dtype).element_size(), 0, 0
            for dim in info.dims:
                if dim == "batch":
                    nb += 1
                elif dim in ("pos", "key_pos"):
                    npos += 1
                elif isinstance(dim, int):
                    const *= dim
            coeffs[(nb, npos)] = coeffs.get((nb, npos), 0) + const
        if len(per_cat) >= 16:
            per_cat.clear()
        per_cat[key] = coeffs
    return int(sum(c * rows**nb * pos**npos for (nb, npos), c in coeffs.items()))


def estimate_run(im: InstrumentedModel, rows: int, pos: int, *, grad: bool = False, sites: Sequence[str] = (),
                 keep_logits: bool = False, kv_len: int = 0) -> MemoryEstimate:
    """:func:`estimate_forward_bytes` for a forward of ``im`` (its ``family.dims`` and parameter dtype), plus
    the exact size of caching ``sites`` (:func:`cache_bytes`) as the part ``cache``.

    A caching run's peak is the forward's plus the cache: measured (the smaller of two runs, after a
    ``malloc_trim``) at 1.0x of that sum on the fp32 models of ``tests/mishax_py/test_memory.py`` and 1.1x on
    the bf16 Gemma-2-2B-shaped model of ``benchmarks/scale.py``. A process that has freed and reallocated
    caches of other shapes may hold more (heap fragmentation, up to 1.3x seen), which the budget's share
    (:data:`BUDGET_SHARE`) leaves room for."""
    e = model_dtype(im).itemsize
    est = estimate_forward_bytes(im.family.dims, rows, pos, grad=grad, keep_logits=keep_logits, dtype_bytes=e,
                                 kv_len=kv_len)
    if not sites:
        return est
    est = est.plus(cache=cache_bytes(im, sites, rows, pos))
    if "logits" in sites:  # the cached logits are the returned ones, already in the forward's working set
        est = replace(est, parts={**est.parts, "working": est.parts["working"] - rows * pos * im.family.dims.vocab * e})
    return est


#: The device ``im`` computes on (an accelerate-dispatched model's execution device, never ``meta``); the one
#: definition is :func:`mishax_py.devices.execution_device`.
model_device = execution_device


def memory_budget(device: torch.device | str | None = None, max_memory: int | str | None = None) -> int:
    """The bytes one step may use on ``device``: ``max_memory``, else the process-wide setting, else
    :data:`BUDGET_SHARE` of the available RAM (CPU) or of the free device memory (CUDA)."""
    if max_memory is not None:
        return parse_bytes(max_memory)
    if _max_memory is not None:
        return _max_memory
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(BUDGET_SHARE * (free + max(unused, 0)))
    return int(BUDGET_SHARE * available_ram())


def _budget_source(max_memory: int | str | None, device: torch.device | str | None) -> str:
    if max_memory is not None:
        return "max_memory="
    if _max_memory is not None:
        return "mishax_py.memory.set_max_memory / MISHAX_PY_MAX_MEMORY"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    where = "free device memory" if dev.type == "cuda" else "available RAM"
    return f"{int(BUDGET_SHARE * 100)}% of the {where}"


def check_fits(estimate: MemoryEstimate | int, budget: int, what: str, *, reduce: str = "",
               source: str = "") -> None:
    """Raise :class:`MemoryBudgetError` if ``estimate`` exceeds ``budget`` (bytes), naming both, ``what`` the step
    is, and ``reduce`` (what the caller can make smaller)."""
    est = estimate if isinstance(estimate, MemoryEstimate) else MemoryEstimate({"total": int(estimate)})
    if est.total <= budget:
        return
    src = f" ({source})" if source else ""
    hint = f"; to fit, {reduce}" if reduce else ""
    raise MemoryBudgetError(
        f"{what} needs an estimated {est.describe()} of memory, more than its budget of {format_bytes(budget)}{src}"
        f"{hint}, or raise the budget with max_memory= (or mishax_py.memory.set_max_memory)", est, budget, what)


def check_budget(estimate: MemoryEstimate, what: str, *, device: torch.device | str | None = None,
                 max_memory: int | str | None = None, reduce: str = "") -> None:
    """:func:`check_fits` against :func:`memory_budget`; with an automatic budget, estimates below
    :data:`CHECK_FLOOR` pass without reading it, and inside :func:`checked` every estimate passes."""
    if (max_memory is None and _max_memory is None and estimate.total < CHECK_FLOOR) or _CHECKED.get():
        return
    check_fits(estimate, memory_budget(device, max_memory), what, reduce=reduce,
               source=_budget_source(max_memory, device))


# -- study estimates: one entry point ---------------------------------------------------------------------


class MemoryChunkingWarning(UserWarning):
    """A study split its work into smaller chunks than its default to fit its memory budget.

    The message names the study, the chunk size it chose, its default and the budget. Silence it with
    ``warnings.filterwarnings("ignore", category=MemoryChunkingWarning)``.
    """


_ESTIMATORS: dict[object, Callable[..., MemoryEstimate]] = {}


def register_estimator(study: Callable[..., object], estimator: Callable[..., MemoryEstimate]) -> None:
    """Make :func:`estimate_memory` answer for ``study`` with ``estimator`` (which takes the study's arguments).

    Each study module registers its own estimator next to the study; the study calls the same estimator
    before it starts, so the estimate a user asks for is the one the study checks.
    """
    _ESTIMATORS[getattr(study, "__func__", study)] = estimator


def estimate_memory(study: Callable[..., object], *args: object, **kwargs: object) -> MemoryEstimate:
    """The peak memory ``study(*args, **kwargs)`` would need, without running anything.

    ``study`` is a study or entry point, called with the same arguments it takes::

        est = estimate_memory(activation_patching, im, clean, corrupt, metric, site="resid_pre")
        est = estimate_memory(attribution_patching, im, clean, corrupt, metric, method="ig", max_memory="2GiB")
        est = estimate_memory(im.run_with_cache, ids)          # bound methods: run, run_with_cache, sweep, walk
        print(est.describe(), est.what, est.chunks, est.fits)

    Known: ``im.run``, ``im.run_with_cache``, ``im.sweep`` (and :func:`mishax_py.execution.sweep.sweep`),
    ``im.walk``, ``activation_patching`` (both engines), ``path_patching``, ``path_patching_by_head``,
    ``attribution_patching`` (every method), ``attribution_patching_sites``, ``site_gradients`` and
    ``feature_circuit``.

    What is counted: what the call allocates at its peak -- activations, caches, autograd's saved tensors and
    gradients, held logits and results -- with the chunk sizes it would choose for its budget
    (``max_memory=``, else :func:`memory_budget`); not the weights of the model, SAEs or transcoders passed to
    it, which exist before the call. The estimate's ``what`` names the step of the peak, ``chunks`` the chunk
    sizes chosen (e.g. ``{"batch_size": 32}``), ``budget`` the budget they were chosen for, and ``fits``
    whether the call would run (it raises :class:`MemoryBudgetError` before any forward otherwise).
    """
    fn = getattr(study, "__func__", study)
    owner = getattr(study, "__self__", None)
    estimator = _ESTIMATORS.get(fn)
    if estimator is None:
        known = sorted({getattr(k, "__qualname__", str(k)) for k in _ESTIMATORS})
        raise TypeError(f"estimate_memory: no estimator for {getattr(study, '__qualname__', study)!r}; "
                        f"known: {', '.join(known)}")
    return estimator(owner, *args, **kwargs) if owner is not None else estimator(*args, **kwargs)


def rows_and_positions(ids: torch.Tensor) -> tuple[int, int]:
    """``(rows, positions)`` of ids ``[batch, pos]``: what estimates are sized by."""
    return int(ids.shape[0]), int(ids.shape[1])


def fit_chunk(per_chunk: Callable[[int], MemoryEstimate], *, default: int, budget: int, minimum: int = 1,
              step: int = 1) -> int:
    """The largest chunk ``n`` in ``[minimum, default]``, a multiple of ``step``, whose ``per_chunk(n)`` estimate
    fits ``budget`` (``minimum`` when none does: the caller's check then fails, naming the estimate).

    ``per_chunk`` must grow with ``n`` (bisection over multiples of ``step``).
    """
    lo, hi = max(minimum // step, 1), max(default // step, 1)
    if hi <= lo or per_chunk(hi * step).total <= budget:
        return max(hi, lo) * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if per_chunk(mid * step).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo * step


def announce_chunking(what: str, chunk: int, default: int, unit: str, budget: int, *, stacklevel: int = 3) -> None:
    """Warn (:class:`MemoryChunkingWarning`) that ``what`` runs ``chunk`` ``unit`` per pass instead of ``default``
    to fit ``budget``; nothing when ``chunk >= default``."""
    if chunk >= default:
        return
    warnings.warn(MemoryChunkingWarning(
        f"{what}: {chunk} {unit} per pass instead of {default}, to fit its memory budget of {format_bytes(budget)} "
        "(max_memory=, mishax_py.memory.set_max_memory, or a share of the free memory)"), stacklevel=stacklevel)


def study_estimate(what: str, steps: Mapping[str, MemoryEstimate], *, budget: int,
                   chunks: Mapping[str, int] | None = None) -> MemoryEstimate:
    """The largest of a study's ``steps`` (``{step description: estimate}``), labelled ``"what (step)"`` and
    carrying ``budget`` and the ``chunks`` chosen."""
    name, worst = max(steps.items(), key=lambda kv: kv[1].total)
    return replace(worst, what=f"{what} ({name})", chunks=dict(chunks or {}), budget=budget)


_CHECKED: ContextVar[bool] = ContextVar("mishax_py_memory_checked", default=False)


@contextlib.contextmanager
def checked() -> Iterator[None]:
    """Inside the block, :func:`check_estimate` passes: a study that checked its whole peak wraps the entry
    points it calls (e.g. ``site_gradients`` inside ``attribution_patching``), whose own checks would
    read another budget than the caller's ``max_memory=``."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_estimate(est: MemoryEstimate, *, reduce: str = "", max_memory: int | str | None = None,
                   device: torch.device | str | None = None) -> None:
    """Raise :class:`MemoryBudgetError` before anything runs when ``est`` does not fit ``est.budget`` (naming the
    estimate, the budget and where it came from, and ``reduce``); passes inside :func:`checked`."""
    if est.budget is None or est.fits or _CHECKED.get():
        return
    check_fits(est, est.budget, est.what or "this step", reduce=reduce, source=_budget_source(max_memory, device))
