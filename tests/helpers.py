"""The helpers the tests share (not fixtures: those are in the ``conftest.py`` files; not tests).

Test modules import these (``from tests.helpers import make_model``) instead of importing each
other or a ``conftest``. Sections:

* models: :func:`tiny_config` / :func:`make_model` (a random 2-layer Gemma 2 with every Gemma 2
  feature on), :func:`make_gemma3` (a random 6-layer Gemma 3), :data:`BUNDLED` / :data:`needs_model` (the
  bundled trained ``gemma2-tiny``),
  :func:`linearise_norm`, :func:`train_transcoder`, :func:`forbid_forward`;
* activation and path patching references: :func:`two_position_metric`, :func:`loop_reference`,
  :func:`with_edit`;
* attribution references: :func:`element_slices`, :func:`exact_patching`;
* attribution graphs without a model: :func:`synthetic_graph`;
* figures: :func:`text_overlaps` (pairs of drawn texts whose boxes overlap);
* headless Chromium (browser tests): :func:`chromium`, :func:`run_chromium`.
* processes of a torch.distributed group (gloo): :func:`run_ranks`.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

import saes
from mishax_py import InstrumentedModel
from mishax_py.interventions import Hook
from mishax_py.naming import site_kind
from mishax_py.studies.attribution.plan import site_layout
from mishax_py.zoo.models import model_path

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- models ----------------------------------------------------------------------------------------
def tiny_config(**overrides: object) -> Gemma2Config:
    """A 2-layer Gemma 2 with every Gemma 2 feature on: GQA, soft-caps, sliding window < context."""
    kwargs: dict[str, Any] = dict(  # Gemma2Config's keywords have many types
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=64,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


def make_model(seed: int = 0, **overrides: object) -> Gemma2ForCausalLM:
    """A random-weight Gemma 2; norm gains are randomised too so `(1 + w)` is exercised."""
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    return model


def make_gemma3(seed: int = 0, n_layers: int = 6) -> Gemma3ForCausalLM:
    """A random Gemma 3 (5 sliding : 1 global, window 8 < 24-token prompts, GQA, QK norm) with random gains.

    Vocabulary 64, d_model 32, 4 heads (2 kv) of d_head 8, d_mlp 48; eager attention.
    """
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                           query_pre_attn_scalar=8, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


BUNDLED = (model_path("gemma2-tiny") / "model.safetensors").is_file()
needs_model = pytest.mark.skipif(not BUNDLED, reason="bundled gemma2-tiny weights are not in this build")


def linearise_norm(norm: Gemma2RMSNorm, gain: float = 1e15) -> None:
    """Make a Gemma 2 RMSNorm exactly linear: with eps = 1e30, mean(x^2) + eps == eps in float32 (for
    mean(x^2) < ~6e22), so rsqrt(.) is the constant 1e-15; the gain (1 + w) = 1e15 restores the scale."""
    norm.eps = 1e30
    with torch.no_grad():
        norm.weight.fill_(gain - 1)


def train_transcoder(im: InstrumentedModel, layer: int, d_sae: int = 64, steps: int = 400, skip: bool = False,
                     seed: int = 0, in_kind: str = "ln2_normalized", out_kind: str = "mlp_out") -> saes.Transcoder:
    """A ReLU transcoder ``blocks.L.{in_kind} -> blocks.L.{out_kind}`` trained for a few hundred Adam steps on
    random prompts (token ids 4..63, so any model with a vocabulary of 64 or more)."""
    g = torch.Generator().manual_seed(seed)
    vocab = im.family.dims.vocab
    ids = torch.randint(min(4, vocab - 1), min(64, vocab), (48, 12), generator=g)
    x_site, y_site = im.layer_site(layer, in_kind), im.layer_site(layer, out_kind)
    with torch.no_grad():
        _, cache = im.run_with_cache(ids, sites=[x_site, y_site])
    d_model = im.family.dims.d_model
    x = cache[x_site].reshape(-1, d_model)
    y = cache[y_site].reshape(-1, d_model)
    tc = saes.Transcoder(d_model, d_sae, d_out=d_model, site=x_site, output_site=y_site, activation="relu", skip=skip)
    torch.manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.normal_(0, d_model ** -0.5)
        tc.W_dec.normal_(0, 0.1 * d_sae ** -0.5)
        tc.b_enc.fill_(-0.05)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    for _ in range(steps):
        f = tc.encode(x)
        loss = ((tc(x) - y) ** 2).sum(-1).mean() + 3e-3 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tc.requires_grad_(False)
    return tc


def forbid_forward(monkeypatch: pytest.MonkeyPatch, im: InstrumentedModel) -> None:
    """Make any forward of ``im.model`` fail loudly: for errors that must come before the model runs."""

    def forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's forward ran")

    monkeypatch.setattr(im.model, "forward", forward)


# -- activation and path patching references -------------------------------------------------------
def two_position_metric(logits: torch.Tensor) -> torch.Tensor:
    """The patching tests' metric. Reads two positions, so the base run's logits of unpatched positions
    must be right too."""
    return (logits[:, -1, 5] - logits[:, -1, 9]).mean() + 0.5 * logits[:, 3, 12].mean()


def loop_reference(im, clean, corrupt, site, by, direction="denoise", **hf):
    """Activation patching as a plain loop of single patched runs (one full forward each, as TransformerLens
    does), read with :func:`two_position_metric`."""
    kind = site_kind(site)
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, cache = im.run_with_cache(source, **hf)
    n_layers, T = im.n_layers, clean.shape[1]
    n_heads = cache[f"blocks.0.{kind}"].shape[1 if kind == "attn.pattern" else 2] if kind.startswith("attn.") else 0
    grids = {"pos": [range(n_layers), range(T)], "layer": [range(n_layers)],
             "head": [range(n_layers), range(n_heads)], "head_pos": [range(n_layers), range(n_heads), range(T)]}
    grid = grids[by]
    out = torch.zeros(*[len(g) for g in grid])
    for idx in itertools.product(*grid):
        name = f"blocks.{idx[0]}.{kind}"
        out[idx] = float(two_position_metric(im.run(base, {name: Hook(_copy(cache[name], kind, by, idx))}, **hf)))
    return out


def _copy(src, kind, by, idx):
    def hook(value):
        value = value.clone()
        if by == "pos":
            value[:, idx[1]] = src[:, idx[1]]
        elif by == "layer":
            value[:] = src
        elif kind == "attn.pattern":  # [batch, head, q_pos, k_pos]
            sel = (slice(None), idx[1]) if by == "head" else (slice(None), idx[1], idx[2])
            value[sel] = src[sel]
        else:  # [batch, pos, head, d_head]
            sel = (slice(None), slice(None), idx[1]) if by == "head" else (slice(None), idx[2], idx[1])
            value[sel] = src[sel]
        return value

    return hook


def with_edit(interventions, site, edit):
    """``interventions`` plus ``edit`` at ``site`` (after theirs there), written out."""
    out = {k: (list(v) if isinstance(v, list) else [v]) for k, v in interventions.items()}
    out[site] = out.get(site, []) + [edit]
    return out


# -- attribution references ------------------------------------------------------------------------
def element_slices(kind: str, by: str, shape) -> list[list[tuple]]:
    """The elements of one layer's grid as index tuples into a site value of ``shape`` (batch first),
    one row of the result per row of the ``by`` grid (``head_pos``: a row per head).

    Spelled out independently of the library's own bookkeeping
    (``mishax_py.studies.attribution.layer.element_masks``), so the references patch them one by one."""
    A = slice(None)
    if by == "layer":
        return [[(A,)]]
    if kind == "stream":
        return [[(A, p)] for p in range(shape[1])]
    grids: dict[str, list[list[tuple]]]
    if kind == "head":
        grids = {"head": [[(A, A, h)] for h in range(shape[2])],
                 "pos": [[(A, p)] for p in range(shape[1])],
                 "head_pos": [[(A, p, h) for p in range(shape[1])] for h in range(shape[2])]}
    else:
        grids = {"head": [[(A, h)] for h in range(shape[1])],
                 "pos": [[(A, A, p)] for p in range(shape[2])],
                 "head_pos": [[(A, h, p) for p in range(shape[2])] for h in range(shape[1])]}
    return grids[by]


def exact_patching(im, source, target, metric, site, by, layers=None):
    """Reference: exact activation patching, effect = metric(patched) - metric(target) per element.

    Every element is its own patched run; for speed the runs are stacked along the batch
    (rows of one element never interact), which is exact, not an approximation.
    """
    layers = range(im.n_layers) if layers is None else layers
    names = [f"blocks.{L}.{site}" for L in layers]
    with torch.no_grad():
        _, cache = im.run_with_cache(source, sites=names)
        base = float(metric(im.run(target)))
    kind = site_layout(im.site_info(names[0]).dims)
    b = target.shape[0]
    out = []
    for n in names:
        s = cache[n]
        grid = element_slices(kind, by, s.shape)
        flat = [ix for row in grid for ix in row]

        def make_hook(s, flat):
            def hook(v):
                v = v.clone()
                for i, ix in enumerate(flat):
                    v[i * b:(i + 1) * b][ix] = s[ix]
                return v

            return hook

        with torch.no_grad():
            logits = im.run(target.repeat(len(flat), 1), interventions={n: make_hook(s, flat)})
        vals = torch.tensor([float(metric(logits[i * b:(i + 1) * b])) - base for i in range(len(flat))])
        out.append(vals.view(len(grid), -1) if by == "head_pos" else vals)
    return torch.stack(out)


# -- attribution graphs without a model -------------------------------------------------------------
def synthetic_graph(seed: int = 0, n_layers: int = 3, n_pos: int = 6, per_cell: int = 2, n_logits: int = 3,
                    tokens: list[str] | None = None):
    """A random acyclic :class:`~mishax_py.circuits.AttributionGraph` (no model), for the viewer and the picture.

    Up to ``per_cell`` active features per (layer, position) with random indices; every feature,
    error and token node feeds the features of later layers at the same or later positions and
    the logits (about 60% of those edges, Gaussian weights, tokens twice as strong); ``n_logits``
    logits with decreasing probabilities. Only what pruning, export and drawing read is
    meaningful (the biases and values are not consistent with the edges).
    """
    from mishax_py.circuits import AttributionGraph

    g = torch.Generator().manual_seed(seed)
    feats = sorted({(layer, p, int(torch.randint(0, 500, (1,), generator=g)))
                    for layer in range(n_layers) for p in range(n_pos)
                    for _ in range(int(torch.randint(0, per_cell + 1, (1,), generator=g)))})  # fmt: skip
    nf, n_err = len(feats), n_layers * n_pos
    n = nf + n_err + n_pos + n_logits

    def layer_pos(i: int) -> tuple[int, int]:
        if i < nf:
            return feats[i][0], feats[i][1]
        if i < nf + n_err:
            return divmod(i - nf, n_pos)
        if i < nf + n_err + n_pos:
            return -1, i - nf - n_err
        return n_layers + 1, n_pos - 1

    A = torch.zeros(n, n)
    for t in [*range(nf), *range(n - n_logits, n)]:
        lt, pt = layer_pos(t)
        for src in range(nf + n_err + n_pos):
            ls, ps = layer_pos(src)
            if ls < lt and ps <= pt and float(torch.rand((), generator=g)) < 0.6:
                A[t, src] = torch.randn((), generator=g) * (2.0 if src >= nf + n_err else 1.0)
    probs = torch.softmax(torch.randn(n_logits, generator=g) * 2, 0).sort(descending=True).values
    logit_tokens = torch.arange(n_logits) * 3 + 1
    return AttributionGraph(
        input_ids=torch.arange(10, 10 + n_pos), tokens=tokens or [f"t{i}" for i in range(n_pos)], n_layers=n_layers,
        features=torch.tensor(feats, dtype=torch.long).reshape(-1, 3), activations=torch.rand(nf, generator=g) + 0.1,
        pre_activations=torch.rand(nf, generator=g), logit_tokens=logit_tokens, logit_probabilities=probs,
        logit_values=torch.randn(n_logits, generator=g), adjacency=A, bias=torch.zeros(n),
        visited=torch.ones(n, dtype=torch.bool), transcoder_layers=list(range(n_layers)),
        error_norms=torch.ones(n_layers, n_pos),
        settings={"logit_strings": {int(t): f"out{int(t)}" for t in logit_tokens}},
    )  # fmt: skip


# -- figures ---------------------------------------------------------------------------------------
def text_overlaps(fig: Any, pad: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of a matplotlib figure that overlap (Agg renderer, pixels): tick labels,
    titles, annotations, legend entries, colourbar labels.

    A rotated text is its rotated rectangle (the unrotated box's size, centred where its axis-aligned
    box is centred), so 45-degree labels side by side do not count as overlapping; each box is shrunk
    by ``pad`` pixels; overlap is tested by separating axes.
    """
    import math

    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    quads = []
    for t in fig.findobj(Text):
        if not (t.get_visible() and t.get_text().strip()):
            continue
        box = t.get_window_extent(renderer)
        if box.width <= 0 or box.height <= 0:
            continue
        angle = t.get_rotation()
        t.set_rotation(0)
        flat = t.get_window_extent(renderer)
        t.set_rotation(angle)
        w, h = flat.width / 2 - pad, flat.height / 2 - pad
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        c, s_ = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        quads.append((t.get_text(), [(cx + c * dx - s_ * dy, cy + s_ * dx + c * dy)
                                     for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h))]))  # fmt: skip

    def separated(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
        for poly in (a, b):
            for i in range(4):
                (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % 4]
                nx, ny = y0 - y1, x1 - x0
                pa = [nx * x + ny * y for x, y in a]
                pb = [nx * x + ny * y for x, y in b]
                if max(pa) <= min(pb) or max(pb) <= min(pa):
                    return True
        return False

    return [(ta, tb) for i, (ta, a) in enumerate(quads) for tb, b in quads[i + 1:] if not separated(a, b)]


# -- headless Chromium -----------------------------------------------------------------------------
def chromium() -> str | None:
    """The path of a Chromium/Chrome executable, or ``None`` (browser tests skip; ``.ci/run`` installs one)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(args: list[str], profile: Path, *, console: bool = False) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` (e.g. ``["--dump-dom", url]``) and a fresh profile folder.

    ``console``: log the page's console to stderr (lines ``...:INFO:CONSOLE...] "message", source: ...``,
    uncaught exceptions as ``"Uncaught ..."``), for tests that require a page to log nothing.
    """
    exe = chromium()
    assert exe is not None
    base = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000"]  # fmt: skip
    if console:
        base += ["--enable-logging=stderr", "--v=0"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


# -- processes of a torch.distributed group ------------------------------------------------------
def run_ranks(code: str, world: int, *args: str, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Run the Python script ``code`` in ``world`` processes started together, as ``torchrun`` would.

    Each process has ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (a free
    port) set, ``OMP_NUM_THREADS=1``, the repository root as its working directory and ``sys.argv[1:] ==
    args``; the script calls ``torch.distributed.init_process_group("gloo")``. Returns each rank's completed
    process (returncode, stdout, stderr as text) in rank order; a rank still running after ``timeout``
    seconds is killed (returncode -9).
    """
    import os
    import socket
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    deadline, done = time.monotonic() + timeout, []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done
