"""SAE and transcoder families.

Every family is an :class:`SAE` (an ``nn.Module``) with parameters

* ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]`` (encoder),
* ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` (decoder; ``d_out == d_in`` except for
  transcoders),

and the inference formula ``pre = x' @ W_enc + b_enc``, ``f = act(pre)``,
``x_hat = f @ W_dec + b_dec`` where ``x' = x - b_dec`` if ``apply_b_dec_to_input``
(SAELens' option of that name) else ``x``. The families differ in ``act``:

* :class:`JumpReLUSAE`: ``(pre > threshold) * relu(pre)`` (Gemma Scope),
* :class:`TopKSAE`: keep the ``k`` largest pre-activations per token, ReLU,
* :class:`ReLUSAE`: ``relu(pre)`` (SAELens "standard"),
* :class:`Transcoder`: any of the above, reading ``site`` and writing ``output_site``,
  with an optional linear skip connection ``x @ W_skip``.

Inputs may carry extra trailing dims that flatten to ``d_in``: an attention-output SAE
reading ``blocks.L.attn.z`` (``[batch, pos, head, d_head]``) flattens head-major to
``[batch, pos, head*d_head]``; :meth:`SAE.forward` restores the input's shape.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mishax_py.naming import layer_of
from saes import kernels
from saes.files import SAELENS_CFG, SAELENS_WEIGHTS, write_json_atomic, write_safetensors_atomic
from saes.sites import hook_name_from_site

__all__ = ["SAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "Transcoder", "fold_to_width", "init_tied"]


class SAE(nn.Module):
    """Common base of all SAE families.

    Args:
        d_in: input width (for ``attn.z`` SAEs, ``n_heads * d_head``).
        d_sae: number of features.
        site: canonical site the SAE reads (and writes), e.g. ``"blocks.20.resid_post"``;
            ``None`` when unknown.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        d_out: output width (defaults to ``d_in``; differs only for transcoders).
        dtype, device: of the parameters.
        decode_mode: ``"auto"`` (sparse or dense by measured density), ``"sparse"``, ``"dense"``.

    Attributes:
        metadata: free-form dict (source file, hub reference, original hook name, ...).
    """

    architecture: ClassVar[str] = "base"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        site: str | None = None,
        apply_b_dec_to_input: bool = False,
        d_out: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        decode_mode: str = "auto",
    ) -> None:
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        d_out = d_in if d_out is None else d_out
        kw: dict[str, Any] = {"dtype": dtype or torch.float32, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.site = site
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.decode_mode = decode_mode
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ shapes
    @property
    def d_in(self) -> int:
        """Input width."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        """Output width (``d_in`` except for transcoders)."""
        return int(self.W_dec.shape[1])

    @property
    def output_site(self) -> str | None:
        """The site the reconstruction is written to (``site`` except for transcoders)."""
        return self.site

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` view of ``x``; folds trailing dims (e.g. ``[.., head, d_head]``) if needed.

        Raises:
            ValueError: when neither the last dim nor the product of the last two is ``d_in``.
        """
        folded = fold_to_width(x, self.d_in)
        if folded is not None:
            return folded
        raise ValueError(
            f"{type(self).__name__} expects inputs [..., {self.d_in}] (or [..., head, d_head] with "
            f"head*d_head = {self.d_in}); got shape {tuple(x.shape)}"
            + (f" at site {self.site!r}" if self.site else "")
        )

    # ------------------------------------------------------------ computation
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``[..., d_sae]`` (``x`` is ``[..., d_in]`` or foldable)."""
        x = self.flatten_input(x).to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return _matmul_bias(x, self.W_enc, self.b_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Family-specific activation: pre-activations -> features (both ``[..., d_sae]``)."""
        raise NotImplementedError

    def activation_spec(self) -> tuple[str, torch.Tensor | None, int | None]:
        """``(kind, threshold, k)`` of the activation for the kernels: ``("jumprelu", θ, None)``,
        ``("relu", None, None)`` or ``("topk", None, k)``; families without one raise ``NotImplementedError``
        (and encode with :meth:`activation` on the torch backend)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of ``x`` (``[..., d_in]``, or ``[..., head, d_head]``).

        With the Triton backend (:mod:`saes.kernels`) a JumpReLU or ReLU encode is the fused
        kernel (:meth:`encode_sparse`) scattered into the dense result; otherwise ``activation(pre_acts(x))``.
        """
        if kernels.resolve_backend(self.device) == "triton" and self._fusable():
            x = self.flatten_input(x)
            return self.encode_sparse(x).to_dense().reshape(*x.shape[:-1], self.d_sae)
        return self.activation(self.pre_acts(x))

    def encode_sparse(self, x: torch.Tensor) -> kernels.SparseFeatures:
        """Active features of ``x`` as :class:`saes.kernels.SparseFeatures` over its ``N`` token rows
        (leading dims flattened), by the current kernel backend."""
        x = self.flatten_input(x).to(self.dtype)
        x = x.reshape(-1, self.d_in)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        try:
            kind, threshold, k = self.activation_spec()
        except NotImplementedError:
            return kernels.SparseFeatures.from_dense(self.activation(self.pre_acts(x)))
        return kernels.encode_sparse(x, self.W_enc, self.b_enc, activation=kind, threshold=threshold, k=k)

    def _fusable(self) -> bool:
        """A JumpReLU or ReLU activation the Triton encode fuses (TopK and custom ones keep the dense path)."""
        try:
            return self.activation_spec()[0] in ("jumprelu", "relu")
        except NotImplementedError:
            return False

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_out]`` from features ``f`` (``[..., d_sae]``)."""
        if f.shape[-1] != self.d_sae:
            raise ValueError(f"decode expects features [..., {self.d_sae}], got {tuple(f.shape)}")
        return _decode(f.to(self.dtype), self.W_dec, self.b_dec, self.decode_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` in ``x``'s shape (``decode(encode(x))``)."""
        out = self.decode(self.encode(x))
        return out.reshape(x.shape) if self.d_out == self.d_in else out

    # ----------------------------------------------------------- conversions
    def feature_directions(self) -> torch.Tensor:
        """Decoder rows ``W_dec`` ``[d_sae, d_out]`` (what feature ``i`` adds per unit)."""
        return self.W_dec

    def config(self) -> dict[str, Any]:
        """Family-specific config (written into SAELens ``cfg.json`` by :meth:`save`)."""
        return {}

    def saelens_config(self) -> dict[str, Any]:
        """The SAELens ``cfg.json`` :meth:`save` writes.

        It carries ``architecture``, ``d_in``, ``d_sae``, ``hook_name`` (the TransformerLens
        alias of the site where one exists) and ``hook_layer``, ``apply_b_dec_to_input``,
        ``dtype``, the family's :meth:`config` (``k`` for TopK), the ``model_name`` /
        ``release`` / ``sae_id`` of :attr:`metadata`, plus ``mishax_site`` so a reload restores
        the exact site.
        """
        cfg: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "architecture": self.architecture,
        }
        if self.site is not None:
            cfg["hook_name"] = hook_name_from_site(self.site)
            cfg["mishax_site"] = self.site
            split = layer_of(self.site)
            if split is not None:
                cfg["hook_layer"] = split[0]
        cfg.update(self.config())
        for key in ("model_name", "release", "sae_id"):
            if key in self.metadata:
                cfg[key] = self.metadata[key]
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write this SAE to folder ``path`` in SAELens format; returns the folder.

        The folder gets ``sae_weights.safetensors`` (every parameter, on CPU) and ``cfg.json``
        (:meth:`saelens_config`), each written atomically (temp file + rename);
        :func:`saes.load` reads it back.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in self.named_parameters()}
        write_safetensors_atomic(tensors, folder / SAELENS_WEIGHTS)
        write_json_atomic(folder / SAELENS_CFG, self.saelens_config(), sort_keys=True)
        return folder

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, site={self.site!r}, dtype={self.dtype}" + (
            ", apply_b_dec_to_input=True" if self.apply_b_dec_to_input else ""
        )


class JumpReLUSAE(SAE):
    """Gemma Scope JumpReLU SAE: ``f = (pre > threshold) * relu(pre)``.

    Extra parameter ``threshold [d_sae]``. Encode is one GEMM and one fused threshold
    (:func:`saes.kernels.jumprelu`).
    """

    architecture: ClassVar[str] = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, **kwargs: Any) -> None:
        super().__init__(d_in, d_sae, **kwargs)
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=self.device))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return kernels.jumprelu(pre, self.threshold)

    def activation_spec(self) -> tuple[str, torch.Tensor | None, int | None]:
        return "jumprelu", self.threshold, None


class ReLUSAE(SAE):
    """ReLU SAE (SAELens ``standard``): ``f = relu(pre)``; optional ``b_dec`` subtraction."""

    architecture: ClassVar[str] = "standard"

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def activation_spec(self) -> tuple[str, torch.Tensor | None, int | None]:
        return "relu", None, None


class TopKSAE(SAE):
    """TopK SAE: keep the ``k`` largest pre-activations per token, then ReLU.

    Args:
        k: features kept per token.
    """

    architecture: ClassVar[str] = "topk"

    def __init__(self, d_in: int, d_sae: int, *, k: int, **kwargs: Any) -> None:
        super().__init__(d_in, d_sae, **kwargs)
        if not 0 < k <= d_sae:
            raise ValueError(f"TopKSAE needs 0 < k <= d_sae={d_sae}, got k={k}")
        self.k = int(k)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return kernels.topk_activation(pre, self.k)

    def activation_spec(self) -> tuple[str, torch.Tensor | None, int | None]:
        return "topk", None, self.k

    def config(self) -> dict[str, Any]:
        return {"k": self.k}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class Transcoder(SAE):
    """A transcoder: encodes the value at ``site`` and predicts the value at ``output_site``.

    Gemma Scope transcoders read ``blocks.L.ln2_normalized`` and write
    ``blocks.L.mlp_out``. ``forward(x)`` returns the prediction of the output site
    (``[..., d_out]``), plus ``x @ W_skip`` when a skip connection is present.

    Args:
        d_in, d_sae, d_out: widths (``d_out`` defaults to ``d_in``).
        site: input site.
        output_site: output site.
        activation: ``"jumprelu"`` (Gemma Scope; has ``threshold``), ``"relu"`` or ``"topk"``.
        k: for ``"topk"``.
        skip: add a linear skip connection ``W_skip [d_in, d_out]``.
    """

    architecture: ClassVar[str] = "transcoder"
    #: the SAELens architecture :meth:`save` writes for each activation.
    SAELENS_ARCHITECTURES: ClassVar[dict[str, str]] = {
        "jumprelu": "jumprelu_transcoder",
        "relu": "transcoder",
        "topk": "topk_transcoder",
    }

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        d_out: int | None = None,
        site: str | None = None,
        output_site: str | None = None,
        activation: str = "jumprelu",
        k: int | None = None,
        skip: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(d_in, d_sae, d_out=d_out, site=site, **kwargs)
        if activation not in ("jumprelu", "relu", "topk"):
            raise ValueError(f"Transcoder activation must be jumprelu, relu or topk, got {activation!r}")
        if activation == "topk" and (k is None or not 0 < k <= d_sae):
            raise ValueError(f"topk transcoder needs 0 < k <= d_sae={d_sae}, got k={k}")
        self.activation_kind = activation
        self.k = None if k is None else int(k)
        self._output_site = output_site
        dtype, device = self.dtype, self.device
        self.threshold = (
            nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device)) if activation == "jumprelu" else None
        )
        self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, dtype=dtype, device=device)) if skip else None

    @property
    def output_site(self) -> str | None:
        """The site this transcoder writes (predicts)."""
        return self._output_site

    @output_site.setter
    def output_site(self, value: str | None) -> None:
        self._output_site = value

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation_kind == "jumprelu":
            assert self.threshold is not None
            return kernels.jumprelu(pre, self.threshold)
        if self.activation_kind == "topk":
            assert self.k is not None
            return kernels.topk_activation(pre, self.k)
        return torch.relu(pre)

    def activation_spec(self) -> tuple[str, torch.Tensor | None, int | None]:
        return self.activation_kind, self.threshold, self.k

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ W_skip`` (``[..., d_out]``) or ``None`` without a skip connection."""
        if self.W_skip is None:
            return None
        x = self.flatten_input(x).to(self.dtype)
        return _matmul(x, self.W_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of the output site's value ``[..., d_out]`` from the input site's value."""
        out = self.decode(self.encode(x))
        skip = self.skip_term(x)
        return out if skip is None else out + skip

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"activation": self.activation_kind, "skip": self.W_skip is not None}
        if self.k is not None:
            cfg["k"] = self.k
        return cfg

    def saelens_config(self) -> dict[str, Any]:
        """:meth:`SAE.saelens_config` with the SAELens transcoder ``architecture`` for the activation,
        ``d_out``, ``hook_name_out`` and ``mishax_output_site``."""
        cfg = super().saelens_config()
        cfg["architecture"] = self.SAELENS_ARCHITECTURES[self.activation_kind]
        cfg["d_out"] = self.d_out
        if self.output_site is not None:
            cfg["hook_name_out"] = hook_name_from_site(self.output_site)
            cfg["mishax_output_site"] = self.output_site
        return cfg

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}, site={self.site!r}, "
            f"output_site={self.output_site!r}, activation={self.activation_kind!r}, "
            f"skip={self.W_skip is not None}, dtype={self.dtype}"
        )


# ---------------------------------------------------------------------------- helpers
def fold_to_width(x: torch.Tensor, width: int) -> torch.Tensor | None:
    """``x`` as ``[..., width]``: itself when its last dim is ``width``, its last two dims folded
    (``[..., head, d_head]`` -> ``[..., head*d_head]``, head-major) when their product is; else ``None``."""
    if x.shape[-1] == width:
        return x
    if x.dim() >= 2 and x.shape[-1] * x.shape[-2] == width:
        return x.reshape(*x.shape[:-2], width)
    return None


def _matmul_bias(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ W + b`` as one GEMM (:func:`saes.kernels.linear`: CPU half precision runs in fp32)."""
    return kernels.linear(x, W, b)


def _matmul(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return kernels.linear(x, W)


def _decode(f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`saes.kernels.decode`, with the dense path of CPU half-precision decoders run in fp32."""
    if mode == "auto":
        mode = kernels.auto_decode_mode(f)
    if mode == "dense" and kernels.is_cpu_half(W_dec):
        return kernels.decode_dense(f.float(), W_dec.float(), b_dec.float()).to(W_dec.dtype)
    return kernels.decode(f, W_dec, b_dec, mode=mode)


def init_tied(sae: SAE, *, generator: torch.Generator | None = None) -> SAE:
    """Initialise ``sae`` for training: unit-norm random decoder rows, ``W_enc = W_dec^T``, zero biases."""
    with torch.no_grad():
        W = torch.randn(sae.d_sae, sae.d_out, generator=generator, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sae.W_dec.copy_(W)
        if sae.d_in == sae.d_out:
            sae.W_enc.copy_(W.T)
        else:
            We = torch.randn(sae.d_in, sae.d_sae, generator=generator) / math.sqrt(sae.d_in)
            sae.W_enc.copy_(We)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
