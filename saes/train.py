"""Training SAEs and transcoders: the Gemma Scope JumpReLU recipe, and TopK.

Training (:func:`train_sae`)
----------------------------
Works from an in-memory ``[n, d_in]`` tensor or an :class:`ActivationStore`.

JumpReLU, Gemma Scope recipe (SPEC §4):

* inputs scaled by a constant ``s`` so that ``E||s x||^2 = 1`` (estimated on the first
  batches); ``b_dec`` subtracted before encoding: ``pre = (s x - b_dec) @ W_enc + b_enc``;
* ``f = JumpReLU_θ(pre) = pre * H(pre - θ)``, ``θ = exp(log θ)`` initialised at 0.001;
* loss ``||s x - x_hat||^2 + λ ||f||_0`` with ``||f||_0 = Σ H(pre - θ)``; λ warmed up
  linearly from 0;
* straight-through estimators (:class:`JumpReLUFunction`, :class:`HeavisideFunction`) with
  the rectangle kernel ``K(u) = 1{|u| < 1/2}`` and bandwidth ε = 0.001:
  ``∂JumpReLU/∂θ = -(θ/ε) K((z-θ)/ε) g``, ``∂H/∂θ = -(1/ε) K((z-θ)/ε) g``
  (and ``∂JumpReLU/∂z = H(z-θ) g``, ``∂H/∂z = 0``);
* ``W_enc = W_dec^T`` at init, decoder rows unit norm, the gradient component parallel to
  each row removed before every step and rows renormalised after it;
* Adam with β = (0, 0.999).

After training the scaling and the ``b_dec`` subtraction are folded into the parameters
(:func:`fold_scaling`), so the saved SAE follows the plain Gemma Scope inference formula
``f = JumpReLU_θ'(x @ W_enc + b_enc')``, ``x_hat = f @ W_dec + b_dec'`` on raw activations,
with ``b_enc' = (b_enc - b_dec W_enc)/s``, ``θ' = θ/s``, ``b_dec' = b_dec/s`` (features come
out in units of ``x``; decoder rows stay unit norm).

TopK SAEs use the same scaling, ``b_dec`` subtraction, initialisation and decoder
constraint, with the loss ``||s x - x_hat||^2``.

Transcoders (``train_sae(x, config, target=y)``): the same recipe (JumpReLU with the L0
penalty, or TopK) predicting ``y`` (e.g. ``mlp_out``) from ``x`` (e.g. ``ln2_normalized``).
Input and target are scaled separately (``s_x``, ``s_y``, each to unit mean squared norm),
nothing is subtracted from the input (``pre = s_x x @ W_enc + b_enc``), the loss is
``||s_y y - y_hat||^2 (+ λ ||f||_0)``, and with ``config.skip`` a linear skip ``s_x x @ W_skip``
(zero at init) is added to ``y_hat``. Folding divides by ``s_y``: ``W_enc' = W_enc s_x/s_y``,
``b_enc' = b_enc/s_y``, ``θ' = θ/s_y``, ``b_dec' = b_dec/s_y``, ``W_skip' = W_skip s_x/s_y``
(features in units of ``y``; decoder rows unit norm). The result is a
:class:`~saes.base.Transcoder` on raw activations.

``target_l0`` (optional, not part of the Gemma Scope recipe): after the λ warm-up, λ is
nudged multiplicatively each step towards the L0 asked for.

Checkpoints and resuming
------------------------
With ``config.checkpoint_dir`` set, :func:`train_sae` writes a checkpoint every
``config.checkpoint_every`` optimiser steps and at the end (:mod:`saes.checkpoint`: atomic,
safetensors + JSON, no pickle): the parameters, Adam's state, the step, λ and the L0 average
that steers it, the scales ``s`` (``s_y``), the data position (pass and batch; the generator
state that shuffled the current pass), the RNG states (the training generator; torch's CPU
generator, CUDA's when training on it, Python's :mod:`random`, NumPy's) and the history.
Started again with the same folder it resumes from the newest checkpoint, and ends with
exactly the parameters of an uninterrupted run (bit-identical on CPU; tested with a run killed
by SIGKILL), or returns at once when that checkpoint is the final one. A checkpoint made with
another config (any field but ``checkpoint_dir``, ``checkpoint_every`` and ``progress``) or other
data is refused with :class:`~saes.checkpoint.CheckpointError` naming the key and both values.

Across processes
----------------
``train_sae(data, cfg, parallel="data")`` trains data-parallel over torch.distributed's default
process group (gloo on CPU, NCCL on GPU; started by ``torchrun`` or ``accelerate launch``). Every
rank passes the same ``data`` and ``cfg`` (checked: a rank with another config or other data makes
every rank raise); the global batch is ``cfg.batch_size`` rows, drawn exactly as in one process
(every rank draws it: from a store, every rank reads the same shards), and rank ``r`` of ``n``
computes the loss of its contiguous slice (:func:`saes.parallel.block`) divided by the global batch
size. The gradients (and the slices' squared-error and L0 sums, for the history and ``target_l0``)
are summed across ranks before the step, so every rank takes the single-process step on the global
batch: the scaling (estimated on the same global batches on every rank), ``b_dec`` init, the
decoder constraint, the λ warm-up and Adam are unchanged, and the parameters equal single-process
training up to fp32 reduction order (tested: the largest difference relative to each parameter's
largest magnitude is below 1e-4 after 30 steps, seen 2e-7; bit-identical between two data-parallel
runs). ``device=None`` trains on the collective device (the current CUDA device under NCCL; call
``torch.cuda.set_device(local_rank)`` first).
Only rank 0 writes checkpoints; on resume rank 0 reads the newest checkpoint and sends it to every
rank (no shared file system needed). A checkpoint does not record the world size: a run may resume
on another number of ranks (same global batches; fp32-close).

``train_saes({name: data}, cfg, parallel="layers")`` trains several SAEs or transcoders (e.g. one
per layer): job ``i`` in the mapping's order is trained by rank ``i % world_size`` (any number of
jobs per rank), and every rank returns every :class:`TrainResult` (the owner broadcasts it; save
them on rank 0). ``parallel="data"`` trains each job data-parallel in turn. Without a process group
both are the single-process calls.

Collecting activations and evaluating
-------------------------------------
:func:`collect_activations` / :class:`ActivationStore` live in :mod:`saes.store`,
:func:`evaluate` / :func:`lm_loss` in :mod:`saes.evaluation`; this module re-exports them so
the whole workflow (collect, train, evaluate) reads ``from saes.train import ...``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saes import kernels
from saes.base import SAE, JumpReLUSAE, TopKSAE, Transcoder, init_tied
from saes.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    restore_rng_states,
    rng_states,
    tensor_fingerprint,
    write_checkpoint,
)
from saes.evaluation import evaluate, lm_loss
from saes.parallel import (
    PARALLEL_MODES,
    all_reduce_sum,
    block,
    broadcast_json,
    broadcast_tensors,
    check_same,
    comm_device,
    rank_world,
)
from saes.store import ActivationStore, collect_activations

__all__ = [
    "ActivationStore",
    "CheckpointError",
    "HeavisideFunction",
    "JumpReLUFunction",
    "TrainConfig",
    "TrainResult",
    "collect_activations",
    "evaluate",
    "fold_scaling",
    "lm_loss",
    "train_sae",
    "train_saes",
]


# ------------------------------------------------------------------------ STEs
def _rect(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rectangle kernel ``K((z - θ)/ε)`` = 1 where ``|z - θ| < ε/2``."""
    return ((z - theta).abs() < eps / 2).to(z.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``JumpReLU_θ(z) = z * H(z - θ)`` with the straight-through pseudo-derivative for θ.

    Forward: ``z [..., d_sae]``, ``θ [d_sae]`` -> ``[..., d_sae]``.
    Backward: ``∂/∂z = H(z - θ) g``; ``∂/∂θ = Σ_batch -(θ/ε) K((z - θ)/ε) g``.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = g * (z > theta).to(g.dtype) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            per = -(theta / eps) * _rect(z, theta, eps) * g
            grad_theta = per.reshape(-1, per.shape[-1]).sum(0)
        return grad_z, grad_theta, None


class HeavisideFunction(torch.autograd.Function):
    """``H(z - θ)`` with the straight-through pseudo-derivative for θ.

    Forward: ``z [..., d_sae]``, ``θ [d_sae]`` -> ``[..., d_sae]`` of 0/1.
    Backward: ``∂/∂z = 0``; ``∂/∂θ = Σ_batch -(1/ε) K((z - θ)/ε) g``.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            per = -(1.0 / eps) * _rect(z, theta, eps) * g
            grad_theta = per.reshape(-1, per.shape[-1]).sum(0)
        return grad_z, grad_theta, None


# --------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_sae` (defaults: the Gemma Scope JumpReLU recipe).

    Attributes:
        d_sae: number of features.
        architecture: ``"jumprelu"`` or ``"topk"``.
        k: features per token for TopK.
        l0_coefficient: λ, the weight of the L0 penalty (after warm-up).
        lambda_warmup_steps: λ rises linearly from 0 over these steps (default: 10% of training).
        lr: Adam learning rate; lr_warmup_steps: linear LR warm-up.
        lr_decay_frac: final fraction of steps over which the LR decays linearly to 0.
        betas: Adam betas (Gemma Scope: (0, 0.999)).
        bandwidth: ε of the rectangle kernel.
        theta_init: initial threshold θ.
        batch_size: tokens per step; steps: optimiser steps (default: one pass over the data).
        scale_batches: batches used to estimate the input scaling ``s``.
        b_dec_init: ``"zeros"`` or ``"mean"`` (mean of the scaling batches).
        target_l0: if set, adapt λ after warm-up towards this L0 (not in the Gemma Scope recipe).
        seed: RNG seed (init and data order).
        device: training device; site: stored on the trained SAE.
        output_site: for transcoders, the site ``target`` was read from (stored on the result).
        skip: for transcoders, train a linear skip connection ``W_skip`` too.
        log_every: record metrics every this many steps; progress: tqdm bar.
        checkpoint_dir: folder for checkpoints; a run started again with the same folder resumes
            from its newest checkpoint (module docs). ``None``: no checkpoints.
        checkpoint_every: write a checkpoint every this many steps (and after the last one).
    """

    d_sae: int
    architecture: str = "jumprelu"
    k: int | None = None
    l0_coefficient: float = 1.0
    lambda_warmup_steps: int | None = None
    lr: float = 7e-5
    lr_warmup_steps: int = 1000
    lr_decay_frac: float = 0.0
    betas: tuple[float, float] = (0.0, 0.999)
    bandwidth: float = 0.001
    theta_init: float = 0.001
    batch_size: int = 4096
    steps: int | None = None
    scale_batches: int = 8
    b_dec_init: str = "zeros"
    target_l0: float | None = None
    seed: int = 0
    device: str | None = None
    site: str | None = None
    output_site: str | None = None
    skip: bool = False
    log_every: int = 100
    progress: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000


# Fields that do not change what training computes: a checkpoint made with other values of these resumes.
_RESUMABLE_ACROSS = ("checkpoint_dir", "checkpoint_every", "progress")


@dataclass
class TrainResult:
    """What :func:`train_sae` returns: the SAE (folded, ready for inference) and its history.

    ``scale`` is the input scaling ``s`` (``s_x``); ``output_scale`` the target's ``s_y`` for a
    transcoder (``None`` for an SAE); ``start_step`` the step the run resumed from (0 for a run
    that started afresh; ``steps`` when a finished run's final checkpoint was found).
    """

    sae: SAE
    scale: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    output_scale: float | None = None
    start_step: int = 0


class _Trainable(nn.Module):
    """Training parameterisation: scaled inputs, ``b_dec`` subtracted, ``log θ``."""

    def __init__(self, d_in: int, cfg: TrainConfig, generator: torch.Generator, d_out: int | None = None) -> None:
        super().__init__()
        proto = JumpReLUSAE(d_in, cfg.d_sae, d_out=d_out)
        init_tied(proto, generator=generator)
        self.W_enc = nn.Parameter(proto.W_enc.detach().clone())
        self.b_enc = nn.Parameter(proto.b_enc.detach().clone())
        self.W_dec = nn.Parameter(proto.W_dec.detach().clone())
        self.b_dec = nn.Parameter(proto.b_dec.detach().clone())
        self.transcoder = d_out is not None  # no b_dec subtraction from an input of another site
        self.W_skip = nn.Parameter(torch.zeros(d_in, proto.d_out)) if self.transcoder and cfg.skip else None
        self.jump = cfg.architecture == "jumprelu"
        self.k = cfg.k
        self.eps = cfg.bandwidth
        if self.jump:
            self.log_theta = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.theta_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` scaled ``[n, d_in]`` -> (reconstruction or prediction, features, L0 per token via the STE)."""
        pre = (x if self.transcoder else x - self.b_dec) @ self.W_enc + self.b_enc
        if self.jump:
            theta = self.log_theta.exp()
            f = JumpReLUFunction.apply(pre, theta, self.eps)
            l0 = HeavisideFunction.apply(pre, theta, self.eps).sum(-1)
        else:
            assert self.k is not None
            x_hat, f = kernels.topk_decode(pre, self.k, self.W_dec, self.b_dec)  # Triton: sparse decode
            l0 = (f > 0).sum(-1).to(x.dtype)
        if self.jump:  # dense: θ's STE needs dL/df at inactive features too (saes.kernels docs)
            x_hat = f @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            x_hat = x_hat + x @ self.W_skip
        return x_hat, f, l0

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each (unit) decoder row."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def renormalise(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def fold_scaling(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    scale: float,
    *,
    output_scale: float | None = None,
    W_skip: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Fold input scaling ``s`` and ``b_dec`` subtraction into inference parameters.

    SAE (``output_scale=None``): training computes ``pre = (s x - b_dec) W_enc + b_enc``,
    ``x_hat_s = f W_dec + b_dec``. Returns parameters of the plain formula on raw ``x`` whose
    features are ``f / s``: ``W_enc``, ``b_enc' = (b_enc - b_dec W_enc)/s``, ``θ' = θ/s``,
    ``W_dec``, ``b_dec' = b_dec/s``.

    Transcoder (``output_scale = s_y``, ``scale = s_x``): training computes
    ``pre = s_x x W_enc + b_enc``, ``y_hat_s = f W_dec + b_dec (+ s_x x W_skip)``. Returns the
    plain formula on raw ``x`` predicting raw ``y`` with features ``f / s_y``:
    ``W_enc' = W_enc s_x/s_y``, ``b_enc' = b_enc/s_y``, ``θ' = θ/s_y``, ``W_dec``,
    ``b_dec' = b_dec/s_y`` and ``W_skip' = W_skip s_x/s_y``.
    """
    if output_scale is None and W_skip is not None:
        raise ValueError("W_skip is a transcoder parameter: pass output_scale too")
    s_y = scale if output_scale is None else output_scale  # an SAE's target is its input
    ratio = scale / s_y
    b_enc = b_enc - b_dec @ W_enc if output_scale is None else b_enc  # only an SAE subtracts b_dec
    out = {"W_enc": W_enc * ratio, "b_enc": b_enc / s_y, "W_dec": W_dec.clone(), "b_dec": b_dec / s_y}
    if threshold is not None:
        out["threshold"] = threshold / s_y
    if W_skip is not None:
        out["W_skip"] = W_skip * ratio
    return out


class _BatchStream:
    """Shuffled ``(x, y)`` batches, pass after pass (``y`` the same rows of ``target``, or ``None``),
    with a position a checkpoint records and :meth:`restore` returns to.

    In-memory data: each pass draws a permutation from ``generator`` and yields its full
    batches (the whole data, unshuffled, when it has fewer rows than a batch). A store: pass ``e``
    is ``store.iter_batches(batch_size, seed=seed + e)``.
    """

    def __init__(self, data: torch.Tensor | ActivationStore, batch_size: int, generator: torch.Generator,
                 seed: int, target: torch.Tensor | None = None) -> None:  # fmt: skip
        self.data, self.target, self.batch_size = data, target, batch_size
        self.generator, self.seed = generator, seed
        self.epoch = 0  # passes completed
        self.index = 0  # batches yielded in the current pass
        self.epoch_state: torch.Tensor | None = None  # generator state before this pass's permutation
        self._resume = False
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def position(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """The position as JSON (pass, batch) and tensors (the generator state that drew this pass)."""
        tensors = {} if self.epoch_state is None else {"rng.epoch_generator": self.epoch_state}
        return {"epoch": self.epoch, "index": self.index}, tensors

    def restore(self, position: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`position` (the caller restores ``generator`` itself)."""
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self.epoch_state = tensors.get("rng.epoch_generator")
        self._resume, self._it = True, None

    def _pass(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        data, target, bs = self.data, self.target, self.batch_size
        if isinstance(data, ActivationStore):
            for x in data.iter_batches(bs, shuffle=True, seed=self.seed + self.epoch, start=start):
                yield x, None
            return
        if self._resume and self.epoch_state is not None:  # this pass's permutation, drawn again
            g = torch.Generator().manual_seed(0)
            g.set_state(self.epoch_state)
            perm = torch.randperm(data.shape[0], generator=g)
        else:
            self.epoch_state = self.generator.get_state()
            perm = torch.randperm(data.shape[0], generator=self.generator)
        self._resume = False
        for j in range(start * bs, data.shape[0] - bs + 1, bs):
            rows = perm[j : j + bs]
            yield data[rows], None if target is None else target[rows]
        if data.shape[0] < bs and start == 0:
            yield data, target

    def __iter__(self) -> _BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        while True:
            if self._it is None:
                self._it = self._pass(self.index)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.index, self._it, self._resume = self.epoch + 1, 0, None, False
                continue
            self.index += 1
            return batch


def _mean_sq_scale(sample: list[torch.Tensor], what: str) -> float:
    """``s`` with ``E||s v||^2 = 1`` over the sampled batches."""
    sq = torch.cat(sample).float().pow(2).sum(-1).mean().item()
    if not math.isfinite(sq) or sq <= 0:
        raise ValueError(f"{what} have mean squared norm {sq}; cannot scale")
    return 1.0 / math.sqrt(sq)


def _data_identity(data: torch.Tensor | ActivationStore, target: torch.Tensor | None) -> dict[str, Any]:
    """What a checkpoint records of the data, to refuse resuming on other data: a tensor's shape, dtype and
    sampled hash (:func:`~saes.checkpoint.tensor_fingerprint`); a store's site, rows, shards and the hash of
    the model and batches it was collected from."""
    if isinstance(data, ActivationStore):
        meta = data.meta
        what = (f"activation store of {data.site!r}: {data.n_rows} rows x {data.d_in} in {len(data.shards)} shards, "
                f"model sha256 {str((meta.get('model') or {}).get('weights_sha256'))[:12]}, "
                f"batches sha256 {str(meta.get('batches_sha256'))[:12]}")  # fmt: skip
    else:
        what = tensor_fingerprint(data)
    return {"data": what, "target": None if target is None else tensor_fingerprint(target)}


def _check_resumable(where: Path, state: dict[str, Any], cfg: TrainConfig, data_id: dict[str, Any]) -> None:
    """Refuse a checkpoint made with another config or other data.

    Raises:
        CheckpointError: naming the checkpoint, the key and both values.
    """
    now = _config_record(cfg)
    was = state.get("config", {})
    for key in sorted(set(now) | set(was)):
        if key in _RESUMABLE_ACROSS:
            continue
        if key not in was or key not in now or was[key] != now[key]:
            raise CheckpointError(
                f"{where}: checkpoint made with {key}={was.get(key)!r}, this run has {key}={now.get(key)!r}; "
                "resume with the same config, or use another checkpoint_dir"
            )
    for key, value in data_id.items():
        if state.get("data_identity", {}).get(key) != value:
            raise CheckpointError(
                f"{where}: {key!r} differs: the checkpoint was made on {state.get('data_identity', {}).get(key)}, "
                f"this run has {value}"
            )


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON values (tuples as lists), as a checkpoint stores it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


# Config fields that may differ between the ranks of one data-parallel run (each rank its own GPU).
_PER_RANK = (*_RESUMABLE_ACROSS, "device")


def _find_checkpoint(
    folder: Path, cfg: TrainConfig, data_id: dict[str, Any], rank: int, dp: bool
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` (checked against ``cfg`` and the data), or ``None``.

    Data-parallel (``dp``): rank 0 reads and checks it and broadcasts it (or its error) to every rank.

    Raises:
        CheckpointError: on every rank, when the checkpoint cannot be read or resumed.
    """
    found, error = None, None
    if rank == 0:
        try:
            found = latest_checkpoint(folder)
            if found is not None:
                _check_resumable(found[0], found[2], cfg, data_id)
        except CheckpointError as e:
            if not dp:
                raise
            error = str(e)
    if not dp:
        return found
    head = broadcast_json({"error": error, "path": None if found is None else str(found[0]),
                          "state": None if found is None else found[2]} if rank == 0 else None)  # fmt: skip
    if head["error"] is not None:
        raise CheckpointError(head["error"])
    if head["path"] is None:
        return None
    tensors = broadcast_tensors(None if found is None else found[1])
    if rank != 0:  # rank 0's CUDA generator states are its own device's
        tensors = {k: t for k, t in tensors.items() if not k.startswith("rng.cuda.")}
    return Path(head["path"]), tensors, head["state"]


_BUCKET = 1 << 24  # elements summed in one collective when gradients are packed together (64 MiB of fp32)


def _sum_gradients(model: nn.Module, sums: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient (zeros where it has none) and ``sums`` over the ranks; return ``sums``.

    Tensors are packed into buckets of up to ``_BUCKET`` elements, one collective each (a larger gradient
    is summed alone, in place): one or a few synchronisations per step instead of one per parameter."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    tensors = [p.grad for p in model.parameters() if p.grad is not None] + [sums]
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        if len(bucket) == 1:
            all_reduce_sum(bucket[0])
        elif bucket:
            flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in bucket]))
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                t.copy_(part.view_as(t))
        bucket.clear()

    for t in tensors:
        if bucket and sum(b.numel() for b in bucket) + t.numel() > _BUCKET:
            flush()
        bucket.append(t)
    flush()
    return sums


def _make_sae(cfg: TrainConfig, d_in: int, d_out: int | None, site: str | None, device: torch.device,
              params: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> SAE:  # fmt: skip
    """The inference SAE (or transcoder) of ``cfg``'s architecture holding ``params``, frozen."""
    sae: SAE
    if d_out is not None:
        sae = Transcoder(d_in, cfg.d_sae, d_out=d_out, site=site, output_site=cfg.output_site,
                         activation=cfg.architecture, k=cfg.k, skip=cfg.skip, device=device)
    elif cfg.architecture == "jumprelu":
        sae = JumpReLUSAE(d_in, cfg.d_sae, site=site, device=device)
    else:
        assert cfg.k is not None
        sae = TopKSAE(d_in, cfg.d_sae, k=cfg.k, site=site, device=device)
    with torch.no_grad():
        for name, t in params.items():
            getattr(sae, name).copy_(t)
    sae.requires_grad_(False).eval()
    sae.metadata.update(metadata)
    return sae


def train_sae(
    data: torch.Tensor | ActivationStore,
    config: TrainConfig,
    *,
    target: torch.Tensor | None = None,
    parallel: str | None = None,
) -> TrainResult:
    """Train a JumpReLU (Gemma Scope recipe) or TopK SAE on ``data`` (``[n, d_in]`` or a store).

    With ``target`` (``[n, d_out]``, row ``i`` the output-site value for input row ``i``; ``data``
    then an in-memory ``[n, d_in]`` tensor) it trains a transcoder ``data -> target`` instead
    (module docs).

    With ``config.checkpoint_dir`` it checkpoints every ``config.checkpoint_every`` steps and
    resumes from the newest checkpoint there (module docs, "Checkpoints and resuming").

    ``parallel="data"``: data-parallel over torch.distributed's default group, every rank passing the same
    ``data`` and ``config`` (module docs, "Across processes"); the plain call without a process group.

    Returns:
        :class:`TrainResult` with the SAE (or :class:`~saes.base.Transcoder`) in the plain
        inference parameterisation (scaling and ``b_dec`` subtraction folded in; works on raw
        activations), the scale(s), and the history (step, loss, mse, l0, lambda, lr every
        ``log_every`` steps).

    Raises:
        ValueError: a config or data that cannot train; data-parallel: ranks with another config or other
            data than rank 0's, or a global batch smaller than the number of ranks.
        CheckpointError: a checkpoint in ``checkpoint_dir`` made with another config or other data.
    """
    from tqdm.auto import tqdm

    cfg = config
    if parallel not in (None, "data"):
        raise ValueError(f"train_sae's parallel must be None or 'data' (several SAEs over ranks: "
                         f"train_saes(..., parallel='layers')), got {parallel!r}")  # fmt: skip
    rank, world = rank_world() if parallel == "data" else (0, 1)
    dp = world > 1
    if cfg.architecture not in ("jumprelu", "topk"):
        raise ValueError(f"architecture must be 'jumprelu' or 'topk', got {cfg.architecture!r}")
    if cfg.architecture == "topk" and (cfg.k is None or not 0 < cfg.k <= cfg.d_sae):
        raise ValueError(f"topk training needs 0 < k <= d_sae, got k={cfg.k}")
    if cfg.checkpoint_dir is not None and (isinstance(cfg.checkpoint_every, bool) or cfg.checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {cfg.checkpoint_every!r}")
    site: str | None
    if isinstance(data, ActivationStore):
        d_in, n_rows = data.d_in, data.n_rows
        site = cfg.site or data.site
    else:
        if data.dim() != 2:
            raise ValueError(f"training data must be [n, d_in], got {tuple(data.shape)}")
        d_in, n_rows = int(data.shape[1]), int(data.shape[0])
        site = cfg.site
    if n_rows == 0:
        raise ValueError("no training data")
    d_out: int | None = None
    if target is not None:
        if isinstance(data, ActivationStore):
            raise ValueError("transcoder training (target=...) takes in-memory tensors: data [n, d_in], "
                             "target [n, d_out]; load the store's rows first")
        if target.dim() != 2 or target.shape[0] != n_rows:
            raise ValueError(f"target must be [n, d_out] with the same n as data {tuple(data.shape)}, "
                             f"got {tuple(target.shape)}")
        d_out = int(target.shape[1])
    elif cfg.skip:
        raise ValueError("skip=True is a transcoder option: pass target=...")
    if cfg.b_dec_init not in ("zeros", "mean"):
        raise ValueError(f"b_dec_init must be 'zeros' or 'mean', got {cfg.b_dec_init!r}")
    device = torch.device(cfg.device) if cfg.device else comm_device() if dp else torch.device("cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.steps if cfg.steps is not None else max(1, n_rows // cfg.batch_size)
    lam_warm = cfg.lambda_warmup_steps if cfg.lambda_warmup_steps is not None else max(1, steps // 10)
    if dp and min(cfg.batch_size, n_rows) < world:
        raise ValueError(f"a global batch of {min(cfg.batch_size, n_rows)} rows cannot be split over {world} ranks")

    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    data_id = _data_identity(data, target) if ckpt_dir is not None or dp else {}
    if dp:
        same = {k: v for k, v in _config_record(cfg).items() if k not in _PER_RANK}
        check_same("train_sae's config and data (parallel='data')",
                   json.dumps({"config": same, "data": data_id, "d_in": d_in, "n_rows": n_rows}, sort_keys=True))
    found = _find_checkpoint(ckpt_dir, cfg, data_id, rank, dp) if ckpt_dir is not None else None

    batches = _BatchStream(data, cfg.batch_size, gen, cfg.seed, target)
    lam = cfg.l0_coefficient
    history: list[dict[str, float]] = []
    l0_ema: float | None = None
    start = 0
    if found is None:
        # Scaling: s with E||s x||^2 = 1 (and s_y for a transcoder's target), from the first scale_batches batches.
        sample = [next(batches) for _ in range(max(1, cfg.scale_batches))]
        scale = _mean_sq_scale([x for x, _ in sample], "activations")
        out_scale = None if target is None else _mean_sq_scale([y for _, y in sample if y is not None], "targets")
        out_sample = [x if y is None else y for x, y in sample]
        model = _Trainable(d_in, cfg, gen, d_out=d_out).to(device)
        if cfg.b_dec_init == "mean":
            with torch.no_grad():
                model.b_dec.copy_(torch.cat(out_sample).float().mean(0).to(device) * (out_scale or scale))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])))
    else:
        _, tensors, state = found
        start = int(state["step"])
        scale, out_scale = float(state["scale"]), state["output_scale"]
        lam, l0_ema, history = float(state["lambda"]), state["l0_ema"], list(state["history"])
        model = _Trainable(d_in, cfg, torch.Generator().manual_seed(0), d_out=d_out).to(device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(tensors[f"model.{name}"])
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])))
        load_optimizer_state(opt, tensors, state["optimizer"])
        gen.set_state(tensors["rng.generator"])
        batches.restore(state["data_position"], tensors)
        restore_rng_states(tensors, state["rng"])
    if dp:  # identical by construction; rank 0's values make sure
        synced = broadcast_tensors({n: p.detach() for n, p in model.named_parameters()} if rank == 0 else None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(synced[name])

    def checkpoint(done: int) -> None:
        assert ckpt_dir is not None
        opt_tensors, opt_json = optimizer_state(opt)
        rng_tensors, rng_json = rng_states((device,))
        position, position_tensors = batches.position()
        tensors: dict[str, torch.Tensor] = {f"model.{name}": p for name, p in model.named_parameters()}
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors.update(position_tensors)
        tensors["rng.generator"] = gen.get_state()
        write_checkpoint(ckpt_dir, done, tensors, {
            "step": done, "steps": steps, "config": _config_record(cfg), "data_identity": data_id,
            "scale": scale, "output_scale": out_scale, "lambda": lam, "l0_ema": l0_ema, "history": history,
            "data_position": position, "optimizer": opt_json, "rng": rng_json,
        })  # fmt: skip

    decay_start = int(steps * (1 - cfg.lr_decay_frac))
    bar = tqdm(total=steps, initial=start, desc=f"train {cfg.architecture}", unit="step",
               disable=not cfg.progress or rank != 0)  # fmt: skip
    try:
        for step in range(start, steps):
            x, y = next(batches)
            n_global = x.shape[0]
            if dp:  # this rank's slice of the global batch
                mine = block(n_global, rank, world)
                x, y = x[mine.start : mine.stop], None if y is None else y[mine.start : mine.stop]
            x = x.to(device=device, dtype=torch.float32) * scale
            if y is None:
                y = x
            else:
                assert out_scale is not None  # targets come with their scale
                y = y.to(device=device, dtype=torch.float32) * out_scale
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
            if step >= decay_start and steps > decay_start:
                lr *= max(0.0, (steps - step) / (steps - decay_start))
            for group in opt.param_groups:
                group["lr"] = lr
            warm = min(1.0, (step + 1) / lam_warm)
            x_hat, f, l0 = model(x)
            if dp:  # the slice's share of the global-batch mean; gradients summed over the ranks
                sums = torch.stack([(y - x_hat).pow(2).sum(), l0.sum()])
                local = (sums[0] + (warm * lam) * sums[1] if model.jump else sums[0]) / n_global
                opt.zero_grad(set_to_none=True)
                local.backward()
                totals = _sum_gradients(model, sums.detach()) / n_global
                mse, l0_mean = totals[0], totals[1]
                loss = mse + (warm * lam) * l0_mean if model.jump else mse
            else:
                mse = (y - x_hat).pow(2).sum(-1).mean()
                l0_mean = l0.mean()
                loss = mse + (warm * lam) * l0_mean if model.jump else mse
                opt.zero_grad(set_to_none=True)
                loss.backward()
            model.remove_parallel_grad()
            opt.step()
            model.renormalise()
            l0_now = float(l0_mean.detach())
            l0_ema = l0_now if l0_ema is None else 0.98 * l0_ema + 0.02 * l0_now
            if cfg.target_l0 is not None and model.jump and warm >= 1.0:
                lam *= math.exp(0.01 * math.tanh(math.log(max(l0_ema, 1e-3) / cfg.target_l0)))
            if step % cfg.log_every == 0 or step == steps - 1:
                history.append({"step": step, "loss": float(loss.detach()), "mse": float(mse.detach()),
                                "l0": l0_now, "lambda": warm * lam, "lr": lr})  # fmt: skip
                bar.set_postfix(mse=f"{float(mse.detach()):.4f}", l0=f"{l0_now:.1f}")
            bar.update(1)
            if ckpt_dir is not None and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
                checkpoint(step + 1)
    finally:
        bar.close()

    with torch.no_grad():
        theta = model.log_theta.exp() if model.jump else None
        params = fold_scaling(model.W_enc, model.b_enc, model.W_dec, model.b_dec, theta, scale,
                              output_scale=out_scale, W_skip=model.W_skip)
    metadata: dict[str, Any] = {"trained": True, "input_scale": scale, "steps": steps}
    if out_scale is not None:
        metadata["output_scale"] = out_scale
    sae = _make_sae(cfg, d_in, d_out, site, device, params, metadata)
    return TrainResult(sae, scale, history, asdict(cfg), output_scale=out_scale, start_step=start)


def _job_config(config: TrainConfig | Mapping[str, TrainConfig], name: str) -> TrainConfig:
    """Job ``name``'s config: its own, or the shared one with ``checkpoint_dir/<name>``."""
    from dataclasses import replace

    if isinstance(config, TrainConfig):
        if config.checkpoint_dir is None:
            return config
        return replace(config, checkpoint_dir=str(Path(config.checkpoint_dir) / name))
    if name not in config:
        raise ValueError(f"train_saes: no config for job {name!r} (configs for {sorted(config)})")
    return config[name]


def _broadcast_result(result: TrainResult | None, src: int, cfg: TrainConfig) -> TrainResult:
    """Rank ``src``'s ``result`` on every rank (parameters, scales, history, config; no pickle), the SAE
    placed on this rank's ``cfg.device`` (CPU when unset)."""
    rank, _ = rank_world()
    head = None
    if rank == src:
        assert result is not None
        sae = result.sae
        head = {"d_in": sae.d_in, "d_out": sae.d_out if isinstance(sae, Transcoder) else None, "site": sae.site,
                "scale": result.scale, "output_scale": result.output_scale, "history": result.history,
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in result.config.items()},
                "start_step": result.start_step, "metadata": sae.metadata}  # fmt: skip
    head = broadcast_json(head, src)
    tensors = broadcast_tensors(None if result is None else dict(result.sae.named_parameters()), src)
    if rank == src:
        assert result is not None
        return result
    their = dict(head["config"], betas=tuple(head["config"]["betas"]))
    device = torch.device(cfg.device) if cfg.device else torch.device("cpu")
    sae = _make_sae(TrainConfig(**their), head["d_in"], head["d_out"], head["site"], device, tensors,
                    head["metadata"])  # fmt: skip
    return TrainResult(sae, head["scale"], head["history"], head["config"], output_scale=head["output_scale"],
                       start_step=head["start_step"])  # fmt: skip


def train_saes(
    data: Mapping[str, torch.Tensor | ActivationStore],
    config: TrainConfig | Mapping[str, TrainConfig],
    *,
    targets: Mapping[str, torch.Tensor] | None = None,
    parallel: str | None = None,
) -> dict[str, TrainResult]:
    """Train several SAEs or transcoders, e.g. one per layer: ``{name: data}`` -> ``{name: TrainResult}``.

    Args:
        data: ``{name: [n, d_in] tensor or ActivationStore}``; names are strings (e.g. the sites).
        config: one :class:`TrainConfig` for every job (with ``checkpoint_dir``, job ``name`` checkpoints
            into ``checkpoint_dir/name``) or ``{name: TrainConfig}``.
        targets: ``{name: [n, d_out] tensor}`` for the jobs that train transcoders.
        parallel: ``None``: this process trains every job, in order. ``"layers"``: job ``i`` (in ``data``'s
            order) is trained by rank ``i % world_size`` of torch.distributed's default group, and every
            rank returns every result (each SAE on that rank's ``config.device``). ``"data"``: each job
            data-parallel over all ranks (:func:`train_sae`), one after another. Every rank passes the same
            jobs (checked). Without a process group both are the plain single-process call.

    Returns:
        ``{name: TrainResult}`` in ``data``'s order; each equals ``train_sae(data[name], ...)`` run alone.

    Raises:
        ValueError: an unknown ``parallel``, non-string names, a missing config, targets for unknown jobs,
            or ranks passing other jobs than rank 0.
        RuntimeError: ``"layers"``: on every rank, when a job failed on its rank (naming the job, the rank
            and the error).
    """
    if parallel not in (None, *PARALLEL_MODES):
        raise ValueError(f"train_saes' parallel must be None, 'data' or 'layers', got {parallel!r}")
    names = list(data)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"train_saes' job names must be strings, got {names!r}")
    cfgs = {n: _job_config(config, n) for n in names}
    targets = dict(targets or {})
    if unknown := sorted(set(targets) - set(names)):
        raise ValueError(f"train_saes: targets for jobs {unknown} that have no data (jobs: {names})")
    rank, world = rank_world()
    if parallel != "layers" or world == 1:
        mode = "data" if parallel == "data" else None
        return {n: train_sae(data[n], cfgs[n], target=targets.get(n), parallel=mode) for n in names}

    jobs = [[n, {k: v for k, v in _config_record(cfgs[n]).items() if k not in _PER_RANK},
             _data_identity(data[n], targets.get(n))] for n in names]  # fmt: skip
    check_same("train_saes' jobs (names, configs, data)", json.dumps(jobs, sort_keys=True))
    mine: dict[str, TrainResult] = {}
    error: str | None = None
    failure: BaseException | None = None
    for i, name in enumerate(names):
        if i % world != rank:
            continue
        try:
            mine[name] = train_sae(data[name], cfgs[name], target=targets.get(name))
        except Exception as e:  # reported to every rank below, so none waits for a result that never comes
            error, failure = f"job {name!r} failed on rank {rank}: {type(e).__name__}: {e}", e
            break
    errors = [e for e in (broadcast_json(error if r == rank else None, src=r) for r in range(world)) if e]
    if errors:
        raise RuntimeError("train_saes(parallel='layers'): " + "; ".join(errors)) from failure
    return {name: _broadcast_result(mine.get(name), i % world, cfgs[name]) for i, name in enumerate(names)}
