"""Studies split across 2 processes (gloo, started here) equal a single process's results.

One spawned job per module: 2 processes initialise a gloo group on a free port, each builds the same
random 2-layer Gemma 2 (``make_model(seed=0)``) and random transcoders, runs every splittable study
inside ``mishax_py.distributed.split()`` and writes its results, forward rows and shares to a
safetensors file. The test process runs the same studies without a split (the single-process
reference). Tolerance: ``atol = rtol = 1e-6`` in fp32 (a rank batches fewer items per forward, and
integrated gradients add the ranks' partial sums in another order, so results may differ from the single
process by float reassociation); the two ranks' results are compared bit for bit (every item comes from
the one rank that computed it).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import instrumentation.gemma2 as g2
import mishax_py.distributed as mdist
import saes
from mishax_py.circuits import attribution_graphs
from mishax_py.circuits.graphs import graph_from_bytes, graph_to_bytes
from mishax_py.interventions import Ablate
from mishax_py.studies import activation_patching, attribution_patching, path_patching_by_head
from tests.helpers import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
TOL = 1e-6
GRAPH_FIELDS = ("features", "activations", "adjacency", "bias", "logit_tokens", "error_norms")
#: studies whose work splits (each rank runs fewer forward rows than one process does)
SPLIT_STUDIES = ("sweep", "ap_packed", "ap_rows", "atp*", "atp-layer", "ig", "ig-input", "path")


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def _transcoders(im: Any) -> list[saes.Transcoder]:
    """Random ReLU transcoders ``ln2_normalized -> mlp_out`` for both layers (seeded; no training)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for layer in range(im.n_layers):
        tc = saes.Transcoder(32, 24, d_out=32, site=im.layer_site(layer, "ln2_normalized"),
                             output_site=im.layer_site(layer, "mlp_out"), activation="relu")
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(tc.W_enc.shape, generator=g) * 0.3)
            tc.W_dec.copy_(torch.randn(tc.W_dec.shape, generator=g) * 0.05)
            tc.b_enc.fill_(-0.1)
        out.append(tc)
    return out


def run_studies() -> dict[str, torch.Tensor]:
    """Every splittable study on the seeded model: ``{study name: result}`` and ``{rows.<study>: forward rows}``.

    Run inside ``split()`` by the spawned ranks and without it by the test process.
    """
    im = g2.instrument(make_model(seed=0))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, 64, (2, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, 64, (2,), generator=g)
    corrupt[:, 5] = torch.randint(4, 64, (2,), generator=g)
    prompts = [torch.randint(4, 64, (n,), generator=g) for n in (6, 9, 7)]  # 3 prompts: unequal shares
    tcs = _transcoders(im)

    rows = {"n": 0}
    plain_forward = im.forward

    def counting(ids: torch.Tensor, **kw: Any) -> Any:
        rows["n"] += int(ids.shape[0])
        return plain_forward(ids, **kw)

    im.forward = counting  # type: ignore[method-assign]
    out: dict[str, torch.Tensor] = {}

    def study(name: str, fn: Callable[[], Any]) -> None:
        rows["n"] = 0
        res = fn()
        out[f"rows.{name}"] = torch.tensor(rows["n"])
        if isinstance(res, dict):
            out.update({f"{name}.{k}": v for k, v in res.items()})
        else:
            out[name] = torch.as_tensor(res).detach().float().clone()

    variants = [{f"blocks.{layer}.attn.z": Ablate(heads=[h])} for layer in range(2) for h in range(4)]
    study("sweep", lambda: im.sweep(clean, variants, metric=_metric))
    study("sweep1", lambda: im.sweep(clean, variants[:1], metric=_metric))  # one item: rank 1 runs nothing
    study("ap_packed", lambda: activation_patching(im, clean, corrupt, _metric, site="resid_pre", engine="packed"))
    study("ap_rows", lambda: activation_patching(im, clean, corrupt, _metric, site="attn.z", by="head_pos",
                                                 engine="rows"))
    for method, site in (("atp", "attn.z"), ("atp*", "attn.q"), ("atp-layer", "resid_pre"), ("ig", "mlp_out"),
                         ("ig-input", "resid_pre")):
        def attribute(method: str = method, site: str = site) -> dict[str, torch.Tensor]:
            res = attribution_patching(im, clean, corrupt, _metric, site=site, method=method, steps=5)
            extra = {"graddrop": res.graddrop} if res.graddrop is not None else {}
            return {"values": res.values.clone(), "score": res.score.clone(), **extra}

        study(method, attribute)
    study("path", lambda: path_patching_by_head(im, clean, corrupt, _metric, receivers=[(1, 0, "q")]))

    def graphs() -> dict[str, torch.Tensor]:
        built = attribution_graphs(im, prompts, tcs, batch_size=16)
        return {f"{i}.{f}": getattr(gr, f).detach().float().clone() for i, gr in enumerate(built)
                for f in GRAPH_FIELDS}

    study("graphs", graphs)
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with mdist.split() as sp:
            out = run_studies()
            # a share that fails on one rank: it raises its error, the other rank a RuntimeError naming it
            try:
                sp.map(2, lambda mine: (_ for _ in ()).throw(KeyError("boom")) if rank == 1 else torch.zeros(1),
                       what="failing items")
                out["error.raised"] = torch.tensor(0)
            except KeyError:
                out["error.raised"] = torch.tensor(1)
            except RuntimeError as e:
                out["error.raised"] = torch.tensor(2 if "rank(s) [1]" in str(e) else 3)
            # gradients do not cross ranks: im.sweep(grad=True) refuses to split (on every rank, before any collective)
            im = g2.instrument(make_model(seed=0))
            try:
                im.sweep(torch.tensor([[5, 6, 7]]), [{"blocks.0.attn.z": Ablate(heads=[0])}], metric=_metric, grad=True)
                out["grad.raised"] = torch.tensor(0)
            except ValueError as e:
                out["grad.raised"] = torch.tensor(int("grad=True" in str(e)))
        for i, s in enumerate(sp.shares):
            out[f"share.{i}"] = torch.tensor([s.n, *s.indices])
        save_file(out, str(Path(folder) / f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("split")
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True,
                                          start_method="spawn")
    return [load_file(str(folder / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_studies()
    finally:
        torch.set_num_threads(before)


def test_every_rank_gets_the_single_process_result(ranks: list[dict[str, torch.Tensor]],
                                                   single: dict[str, torch.Tensor]) -> None:
    results = [k for k in single if not k.startswith("rows.")]
    assert {k.split(".")[0] for k in results} >= {*SPLIT_STUDIES, "sweep1", "atp", "graphs"}
    for name in results:
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got[name], single[name], atol=TOL, rtol=TOL, msg=lambda m, n=name, r=r:
                                       f"{n} on rank {r}: {m}")
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def test_each_rank_runs_only_its_share(ranks: list[dict[str, torch.Tensor]], single: dict[str, torch.Tensor]) -> None:
    # the shares: items rank, rank + 2, ... of the same n on both ranks, together every item once
    shares = [{k: v for k, v in got.items() if k.startswith("share.")} for got in ranks]
    assert shares[0].keys() == shares[1].keys() and len(shares[0]) >= 10
    for key in shares[0]:
        n = int(shares[0][key][0])
        assert int(shares[1][key][0]) == n
        mine = [shares[r][key][1:].tolist() for r in range(WORLD)]
        assert mine == [list(range(r, n, WORLD)) for r in range(WORLD)]
    # the forward rows: each rank runs fewer than one process does, the ranks together at least as many
    for name in SPLIT_STUDIES:
        one = int(single[f"rows.{name}"])
        per_rank = [int(got[f"rows.{name}"]) for got in ranks]
        assert all(n < one for n in per_rank), (name, per_rank, one)
        assert sum(per_rank) >= one, (name, per_rank, one)
    # plain AtP is one forward and backward: every rank runs it whole
    assert [int(got["rows.atp"]) for got in ranks] == [int(single["rows.atp"])] * WORLD


def test_a_failed_share_stops_every_rank(ranks: list[dict[str, torch.Tensor]]) -> None:
    assert [int(got["error.raised"]) for got in ranks] == [2, 1]
    assert [int(got["grad.raised"]) for got in ranks] == [1, 1]


def test_split_needs_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"), mdist.split():
        pass
    assert mdist.active_split() is None


def test_outside_split_no_collective_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a torch.distributed call outside split()")

    for name in ("all_gather", "get_rank", "get_world_size", "is_initialized"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    im = g2.instrument(make_model(seed=0))
    ids = torch.randint(4, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    im.sweep(ids, [{"blocks.0.attn.z": Ablate(heads=[0])}], metric=_metric)
    activation_patching(im, ids, ids.flip(1), _metric)


def test_a_graph_survives_bytes() -> None:
    im = g2.instrument(make_model(seed=0))
    ids = torch.randint(4, 64, (7,), generator=torch.Generator().manual_seed(2))
    graph = attribution_graphs(im, [ids], _transcoders(im))[0]
    back = graph_from_bytes(graph_to_bytes(graph))
    for f in ("input_ids", "features", "activations", "pre_activations", "logit_tokens", "logit_probabilities",
              "logit_values", "adjacency", "bias", "visited", "error_norms"):
        assert torch.equal(getattr(back, f), getattr(graph, f)), f
    assert back.settings == graph.settings and back.tokens == graph.tokens and back.prompt == graph.prompt
    assert back.transcoder_layers == graph.transcoder_layers and back.n_layers == graph.n_layers
    with pytest.raises(ValueError, match="attribution graph"):
        graph_from_bytes(b"not a graph at all")
