"""InstrumentedModel: a Hugging Face model whose activation sites can be read and rewritten.

The model itself is unchanged (``im.model`` is the same object and still works as a
HF model); its family's source patches placed ``tag(...)`` calls at every site, and
this class decides, per run, what those calls do: record values (``run_with_cache``),
apply interventions (``run``, ``intervene``), batch many experiments (``sweep``) or
hand each value to a Python loop (``walk``).

Everything here is model-agnostic: a family module supplies the site catalogue and a
:class:`~mishax_py.family.ModelFamily` (what studies need to know of the model).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mishax_py import memory
from mishax_py.cache import ActivationCache, DeviceStore
from mishax_py.devices import model_dtype
from mishax_py.family import ModelFamily
from mishax_py.inputs import Ids, local_tokenizer, model_inputs
from mishax_py.interventions.base import Intervention, Interventions, as_intervention_list
from mishax_py.interventions.watch import SelectionWatch
from mishax_py.naming import layer_site
from mishax_py.runtime import Handler, RecordingTables, RunContext, SiteEvent, SiteKey, activate, active_context
from mishax_py.sites import SiteCatalogue, SiteInfo, UnknownSiteError

if TYPE_CHECKING:
    from mishax_py.execution.walk import Walker

# ``Interventions`` (the ``{site: intervention}`` mapping) is defined in mishax_py.interventions.base; it is
# importable from here too, as before.
__all__ = ["InstrumentedModel", "Interventions"]


class InstrumentedModel:
    """A HF causal LM with named sites; see the README for a tour.

    Args:
        model: the HF model (already patched by its family's ``install()``).
        catalogue: the model's sites in forward order.
        family: the family's facts about this model instance (sizes, attention, norms, ...) and
            its ``ensure_installed`` (raises if the patches were uninstalled; nothing re-installs them silently).
        tokenizer: what text inputs are tokenised with (:attr:`tokenizer`; :mod:`mishax_py.inputs`).
    """

    def __init__(self, model: nn.Module, catalogue: SiteCatalogue, family: ModelFamily, *,
                 tokenizer: Any = None) -> None:
        self.model = model
        self.catalogue = catalogue
        self.family = family
        self._tokenizer = tokenizer
        self._tokenizer_searched = tokenizer is not None
        self._recording_tables = RecordingTables()  # thread-safe; a deep copy of the model starts it empty

    @property
    def tokenizer(self) -> Any:
        """The tokenizer text inputs are tokenised with (``im.run("some text")``; :mod:`mishax_py.inputs`).

        The one given to the family's ``instrument(model, tokenizer=...)`` or assigned here; else the one
        ``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)`` loads from the model's
        own folder (looked up once, on first use; never downloaded); else ``None``.
        """
        if not self._tokenizer_searched:
            self._tokenizer_searched = True
            self._tokenizer = local_tokenizer(self.model)[0]
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokenizer_searched = True

    # -- the catalogue ------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.family.dims.n_layers

    def layer_site(self, layer: int, kind: str) -> str:
        """The canonical name of site ``kind`` in layer ``layer`` (``(3, "attn.z")`` -> ``"blocks.3.attn.z"``)."""
        return layer_site(layer, kind)

    def site_names(self, pattern: str | None = None) -> list[str]:
        """Canonical site names in forward order (optionally those matching a name/alias/glob)."""
        return self.catalogue.names() if pattern is None else self.catalogue.resolve(pattern)

    def site_info(self, name: str) -> SiteInfo:
        """Shape (symbolic), dtype and source location of a site (name or alias)."""
        spec = self.catalogue.by_name[self.catalogue.canonical(name)]
        dtype = spec.dtype if spec.dtype is not None else model_dtype(self.model)
        return SiteInfo(spec.name, spec.layer, spec.dims, dtype, spec.where, spec.alias)

    def resolve(self, patterns: str | Iterable[str]) -> list[str]:
        """Canonical names for names, aliases and globs, in forward order."""
        return self.catalogue.resolve_all(patterns)

    # -- building runs --------------------------------------------------------------------
    def context(
        self,
        interventions: Interventions | None = None,
        *,
        batch: int | None = None,
        pos: int | None = None,
        rows: torch.Tensor | None = None,
        parent: RunContext | None = None,
    ) -> RunContext:
        """A run context with ``interventions`` registered (validated first; nothing is active yet).

        Nests in ``parent`` (default: the run active in this thread), whose handlers apply first.
        ``rows`` restricts every intervention to those batch rows (used by sweeps).
        """
        self.family.ensure_installed()
        ctx = RunContext(parent if parent is not None else active_context())
        # with rows=, interventions see a sub-batch: do not check them against the full batch
        for name, ivs in self.plan(interventions, batch=None if rows is not None else batch, pos=pos).items():
            spec = self.catalogue.by_name[name]
            for iv in ivs:
                ctx.add(spec.key, name, spec.layer, iv, rows)
        return ctx

    def plan(
        self, interventions: Interventions | None, *, batch: int | None = None, pos: int | None = None
    ) -> dict[str, list[Intervention]]:
        """``{canonical site: [interventions in order]}`` in forward order, each validated with ``check``.

        Resolves names, aliases and globs; wraps plain functions in :class:`Hook`; adds each
        intervention's ``companions()`` (other sites it needs handlers at, e.g. a transcoder
        splice recording its input site) before it. Raises before anything runs.
        """
        planned: dict[str, list[Intervention]] = {}
        for pattern, value in (interventions or {}).items():
            ivs = as_intervention_list(value)
            for name in self.catalogue.resolve(pattern):
                for iv in ivs:
                    self._plan_one(planned, name, iv, batch, pos)
        return dict(sorted(planned.items(), key=lambda item: self.catalogue.order(item[0])))

    def _plan_one(self, planned: dict[str, list[Intervention]], name: str, iv: Intervention,
                  batch: int | None, pos: int | None) -> None:
        """Add ``iv`` at ``name`` to ``planned``, its companions first (a method, not a recursive
        closure: a closure that calls itself is a reference cycle that would keep the plan alive)."""
        for other, companion in dict(getattr(iv, "companions", dict)()).items():
            self._plan_one(planned, self.catalogue.canonical(other), companion, batch, pos)
        if not any(existing is iv for existing in planned.get(name, [])):
            iv.check(name, self.site_info(name).concrete_shape(batch, pos))
            planned.setdefault(name, []).append(iv)

    def add_handler(self, ctx: RunContext, site: str, handler: Handler, rows: torch.Tensor | None = None) -> None:
        """Register a raw handler at ``site`` (name or alias) in ``ctx``."""
        spec = self.catalogue.by_name[self.catalogue.canonical(site)]
        ctx.add(spec.key, spec.name, spec.layer, handler, rows)

    # -- running --------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, **hf_kwargs: Any) -> torch.Tensor:
        """The model's forward returning logits (runs whatever context is active)."""
        hf_kwargs.setdefault("use_cache", False)
        return self.model(input_ids=ids, **hf_kwargs).logits

    def run(self, ids: Ids, interventions: Interventions | None = None, *, max_memory: int | str | None = None,
            **hf_kwargs: Any) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` of a forward pass with ``interventions`` applied.

        ``ids``: token ids ``[batch, pos]`` (or ``[pos]``, a list), text or a tokenizer's output
        (:mod:`mishax_py.inputs`; checked before the forward). HF keyword arguments (``attention_mask``,
        ...) pass through. Autograd follows the caller's grad mode. The forward's memory is estimated
        first; an estimate over the budget (``max_memory``: bytes or ``"8GiB"``; default
        :func:`mishax_py.memory.memory_budget`) raises :class:`~mishax_py.memory.MemoryBudgetError` at
        once. An edit that selects nothing warns (:mod:`mishax_py.interventions.watch`).
        """
        ids, hf_kwargs = model_inputs(ids, self, hf_kwargs)
        self._check_memory("im.run", ids, max_memory, grad=torch.is_grad_enabled(), interventions=interventions)
        ctx = self.context(interventions, batch=ids.shape[0], pos=ids.shape[1])
        with activate(ctx), SelectionWatch([interventions], "im.run"):
            return self.forward(ids, **hf_kwargs)

    def _check_memory(self, what: str, ids: torch.Tensor, max_memory: int | str | None, *, grad: bool,
                      sites: Sequence[str] = (), interventions: Interventions | None = None) -> None:
        """Fail before the forward when its estimate exceeds the budget (:func:`mishax_py.memory.check_budget`)."""
        rows, pos = ids.shape
        est = _with_interventions(self, memory.estimate_run(self, rows, pos, grad=grad, sites=sites), interventions,
                                  rows, pos)
        cached = f", caching {len(sites)} sites" if sites else ""
        reduce = "pass fewer rows or positions at a time" + (", or cache fewer sites" if sites else "")
        memory.check_budget(est, f"{what} (one forward of {rows} rows x {pos} positions{cached})",
                            device=ids.device, max_memory=max_memory, reduce=reduce)

    def run_with_cache(
        self,
        ids: Ids,
        sites: str | Iterable[str] | None = None,
        *,
        grad: bool = False,
        interventions: Interventions | None = None,
        max_memory: int | str | None = None,
        cache_device: torch.device | str | None = None,
        **hf_kwargs: Any,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Logits and an :class:`ActivationCache` of the requested sites (default: all).

        ``sites``: names, TL aliases or globs; derived names such as
        ``"blocks.1.resid_post.sae.features"`` (offered by interventions like SAE
        splices) are accepted too. Values are recorded after the site's interventions.
        With ``grad=False`` cached tensors are detached (no graph kept). With
        ``grad=True`` they stay in the graph and receive ``.grad`` on ``backward()``. Inputs, the memory
        check (``max_memory``; the estimate includes the cache) and empty selections as for :meth:`run`.

        ``cache_device`` (e.g. ``"cpu"``): every recorded value is moved there as it is recorded
        (:class:`mishax_py.cache.DeviceStore`; CUDA -> CPU copies are non-blocking and waited for before
        this returns), so a long cache of a big model does not fill the accelerator, which then holds each
        value only while the forward needs it; the memory check then leaves the cache out of the model
        device's estimate. ``None`` (default): values stay where the model computed them (on a model split
        over devices, each on its layer's device), at no extra cost. Not with ``grad=True`` (a moved copy
        is not the tensor the backward reaches).
        """
        if cache_device is not None and grad:
            raise ValueError(f"run_with_cache(grad=True, cache_device={str(cache_device)!r}): a cache that keeps "
                             "the autograd graph stays on the model's devices; move cache[...].grad after backward()")
        ids, hf_kwargs = model_inputs(ids, self, hf_kwargs)
        names, derived = self._cache_plan(sites)
        elsewhere = cache_device is not None and torch.device(cache_device) != ids.device
        self._check_memory("im.run_with_cache", ids, max_memory, grad=grad or torch.is_grad_enabled(),
                           sites=() if elsewhere else names, interventions=interventions)
        ctx = self.context(interventions, batch=ids.shape[0], pos=ids.shape[1])
        store: dict[str, torch.Tensor] = {} if cache_device is None else DeviceStore(cache_device)
        if grad:
            for name in names:
                self.add_handler(ctx, name, _recorder(store, name, grad))
        else:  # recorded by the run itself: no handler call per site, the table built once per site list
            ctx.record_into(store, self._recording_table(tuple(names)))
        if derived:
            ctx.derived_sinks.append(_derived_recorder(store, derived, grad))
        with activate(ctx), SelectionWatch([interventions], "im.run_with_cache"):
            logits = self.forward(ids, **hf_kwargs)
        if isinstance(store, DeviceStore):
            store.finish()
        store_device = logits.device if cache_device is None else torch.device(cache_device)
        if store_device.type == "cpu":  # let the next run reuse this cache's memory (see mishax_py.memory)
            memory.reserve_for(sum(v.numel() * v.element_size() for v in store.values()))
        if list(store) != names:  # sites fire in catalogue order; derived names and skipped layers don't
            order = {n: i for i, n in enumerate(names)}
            store = dict(sorted(store.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        mask = hf_kwargs.get("attention_mask")
        mask = mask.detach().to(store_device) if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        return logits, ActivationCache(store, self.catalogue.canonical, attention_mask=mask)

    def _recording_table(self, names: tuple[str, ...]) -> dict[SiteKey, Any]:
        """The shared recording table of ``names`` (built once per site list; the last few are kept)."""
        by_name = self.catalogue.by_name
        return self._recording_tables.get(names, lambda: [(by_name[n].key, n, by_name[n].layer) for n in names])

    @contextlib.contextmanager
    def intervene(self, interventions: Interventions) -> Iterator[RunContext]:
        """Apply ``interventions`` to every forward in the block, ``model.generate(...)`` included.

        During generation with a KV cache, positions are absolute (see the interventions'
        ``positions=`` docs); nested blocks compose, outer interventions first. An edit that selects
        nothing in any forward of the block warns when the block ends (:mod:`mishax_py.interventions.watch`).
        """
        ctx = self.context(interventions)
        with activate(ctx), SelectionWatch([interventions], "im.intervene"):
            yield ctx

    def sweep(
        self,
        ids: Ids,
        variants: Sequence[Interventions],
        metric: Callable[[torch.Tensor], Any] | None = None,
        *,
        batch_size: int | None = None,
        progress: bool | None = None,
        grad: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Run many intervention variants batched; their results stacked, each equal to running it alone.

        Returns ``[n_variants]`` for a scalar ``metric(logits [B, pos, vocab])``, ``[n_variants, *S]`` for a
        metric returning a tensor of shape ``S``, the logits ``[n_variants, B, pos, vocab]`` without a metric.
        Detached unless ``grad=True`` (then gradients flow to whatever the metric depends on).
        ``batch_size`` in rows; ``progress`` a tqdm bar (``None``: automatic). Other keywords
        (``share_prefix=``, ``max_memory=``, HF kwargs such as ``attention_mask``) pass through; see
        :func:`mishax_py.execution.sweep.stacked_sweep` (and :func:`~mishax_py.execution.sweep.sweep`
        for a list of arbitrary per-variant results).
        """
        from mishax_py.execution.sweep import stacked_sweep

        return stacked_sweep(self, ids, variants, metric, batch_size=batch_size, progress=progress, grad=grad,
                             **kwargs)

    def walk(self, ids: Ids, **hf_kwargs: Any) -> Walker:
        """A Mishax-style loop over ``(site, value)`` in forward order; see :mod:`mishax_py.execution.walk`."""
        from mishax_py.execution.walk import Walker

        return Walker(self, ids, **hf_kwargs)

    def _cache_plan(self, sites: str | Iterable[str] | None) -> tuple[list[str], list[tuple[list[str], str]]]:
        if sites is None:
            return self.catalogue.names(), []
        patterns = [sites] if isinstance(sites, str) else list(sites)
        names: list[str] = []
        derived: list[tuple[list[str], str]] = []
        for pattern in patterns:
            try:
                names.extend(self.catalogue.resolve(pattern))
            except UnknownSiteError:
                split = self._split_derived(pattern)
                if split is None:
                    raise
                derived.append(split)
        return list(dict.fromkeys(names)), derived

    def _split_derived(self, pattern: str) -> tuple[list[str], str] | None:
        """``"blocks.*.resid_post.sae.features"`` -> (matching sites, ``"sae.features"``)."""
        parts = pattern.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                sites = self.catalogue.resolve(".".join(parts[:cut]))
            except UnknownSiteError:
                continue
            return sites, ".".join(parts[cut:])
        return None

    def __repr__(self) -> str:
        return f"InstrumentedModel({self.family.name}, {self.n_layers} layers, {len(self.catalogue.specs)} sites)"



def _recorder(store: dict[str, torch.Tensor], name: str, grad: bool) -> Handler:
    def record(value: torch.Tensor, event: SiteEvent) -> torch.Tensor:
        if not grad:
            store[name] = value.detach() if value.requires_grad else value
            return value
        if value.requires_grad:
            value.retain_grad()
        else:  # nothing upstream needs gradients: make this value a leaf that receives them
            value = value.detach().requires_grad_(True)
        store[name] = value
        return value.view_as(value)  # downstream must flow through the stored tensor

    return record


def _derived_recorder(
    store: dict[str, torch.Tensor], derived: list[tuple[list[str], str]], grad: bool
) -> Callable[[str, torch.Tensor], None]:
    def sink(name: str, value: torch.Tensor) -> None:
        for sites, suffix in derived:
            for site in sites:
                if name.startswith(site + ".") and fnmatch.fnmatchcase(name[len(site) + 1 :], suffix):
                    if grad and value.requires_grad:
                        value.retain_grad()
                    store[name] = value if grad else value.detach()
                    return

    return sink



# -- memory estimates of the entry points (mishax_py.memory.estimate_memory) ----------------------------------
def _with_interventions(im: InstrumentedModel, est: memory.MemoryEstimate, interventions: Interventions | None,
                        rows: int, pos: int) -> memory.MemoryEstimate:
    """``est`` with the largest transient of ``interventions`` that declare one (``peak_bytes(rows, pos)``, e.g.
    an SAE splice's features and its weights' compute copies), over the residual-stream tensors alive at its site
    (``est.parts["working"]`` holds the forward's own largest transient, which comes at another time)."""
    peak = 0
    for ivs in (interventions or {}).values():
        for iv in as_intervention_list(ivs):
            fn = getattr(iv, "peak_bytes", None)
            if callable(fn):
                peak = max(peak, int(fn(rows, pos)))
    if not peak:
        return est
    d = im.family.dims.d_model
    stream = (8 * torch.empty((), dtype=model_dtype(im)).element_size() + 16) * rows * pos * d
    return est.plus(interventions=max(0, stream + peak - est.parts.get("working", 0)))


def _forward_estimate(im: InstrumentedModel, what: str, ids: torch.Tensor, max_memory: int | str | None, *,
                      grad: bool, sites: Sequence[str] = (), interventions: Interventions | None = None
                      ) -> memory.MemoryEstimate:
    """The estimate :meth:`InstrumentedModel._check_memory` checks, labelled and with its budget."""
    rows, pos = ids.shape
    est = _with_interventions(im, memory.estimate_run(im, rows, pos, grad=grad, sites=sites), interventions, rows,
                              pos)
    cached = f", caching {len(sites)} sites" if sites else ""
    return memory.study_estimate(what, {f"one forward of {rows} rows x {pos} positions{cached}": est},
                                 budget=memory.memory_budget(ids.device, max_memory))


def _estimate_run(im: InstrumentedModel, ids: Ids, interventions: Interventions | None = None, *,
                  max_memory: int | str | None = None, **hf_kwargs: Any) -> memory.MemoryEstimate:
    ids, _ = model_inputs(ids, im, hf_kwargs)
    return _forward_estimate(im, "im.run", ids, max_memory, grad=torch.is_grad_enabled(), interventions=interventions)


def _estimate_run_with_cache(im: InstrumentedModel, ids: Ids, sites: str | Iterable[str] | None = None, *,
                             grad: bool = False, interventions: Interventions | None = None,
                             max_memory: int | str | None = None, cache_device: torch.device | str | None = None,
                             **hf_kwargs: Any) -> memory.MemoryEstimate:
    ids, _ = model_inputs(ids, im, hf_kwargs)
    names, _derived = im._cache_plan(sites)
    elsewhere = cache_device is not None and torch.device(cache_device) != ids.device
    return _forward_estimate(im, "im.run_with_cache", ids, max_memory, grad=grad or torch.is_grad_enabled(),
                             sites=() if elsewhere else names, interventions=interventions)


def _estimate_sweep(im: InstrumentedModel, ids: Ids, variants: Sequence[Interventions],
                    metric: Callable[[torch.Tensor], Any] | None = None, *, batch_size: int | None = None,
                    progress: bool | None = None, grad: bool = False, **kwargs: Any) -> memory.MemoryEstimate:
    from mishax_py.execution.sweep import sweep

    with torch.set_grad_enabled(grad):  # as im.sweep runs it
        return memory.estimate_memory(sweep, im, ids, variants, metric, batch_size=batch_size, **kwargs)


def _estimate_walk(im: InstrumentedModel, ids: Ids, **hf_kwargs: Any) -> memory.MemoryEstimate:
    max_memory = hf_kwargs.pop("max_memory", None)
    hf_kwargs.pop("sites", None)
    ids, _ = model_inputs(ids, im, hf_kwargs)
    return _forward_estimate(im, "im.walk", ids, max_memory, grad=torch.is_grad_enabled())


memory.register_estimator(InstrumentedModel.run, _estimate_run)
memory.register_estimator(InstrumentedModel.run_with_cache, _estimate_run_with_cache)
memory.register_estimator(InstrumentedModel.sweep, _estimate_sweep)
memory.register_estimator(InstrumentedModel.walk, _estimate_walk)
