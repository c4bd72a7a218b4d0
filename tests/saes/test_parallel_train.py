"""saes.train across processes (2 gloo ranks started by the test): data-parallel training equals
single-process training on the same global batches (fp32 tolerance below), only rank 0 checkpoints
and every rank resumes from it, SAEs placed on ranks (parallel="layers") equal each trained alone.

Tolerance: data-parallel and single-process runs differ only in fp32 reduction order (each rank sums
its slice, the slices' gradients are summed across ranks). After 30 Adam steps the largest difference
of any parameter relative to that parameter's largest magnitude stays below ``RTOL`` = 1e-4 (seen:
2.0e-7 to 2.4e-7 for JumpReLU, TopK and a transcoder); two data-parallel runs agree bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saes.train import TrainConfig, TrainResult, train_sae
from tests.helpers import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU ops: see conftest.one_thread

RTOL = 1e-4  # max |dp - single| / max |single| per parameter, fp32, 30 steps

_CHILD = """
import json, sys
from dataclasses import replace
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
from safetensors.torch import load_file, save_file
import saes.train
from saes.train import CheckpointError, TrainConfig, train_sae, train_saes

dist.init_process_group("gloo")
written = []  # the checkpoints this rank writes
write = saes.train.write_checkpoint
saes.train.write_checkpoint = lambda folder, step, *a: written.append(step) or write(folder, step, *a)
rank = dist.get_rank()
args = json.loads(sys.argv[1])
data = load_file(args["data"])
out = {}
report = {}

def params(name, res):
    for k, v in res.sae.named_parameters():
        out[f"{name}.{k}"] = v.detach().contiguous()
    report[name] = {"start_step": res.start_step, "history": res.history, "scale": res.scale,
                    "output_scale": res.output_scale, "metadata": res.sae.metadata,
                    "type": type(res.sae).__name__, "site": res.sae.site}

def cfg(d):
    return TrainConfig(**dict(d, betas=tuple(d["betas"])))

for name, c in args.get("data_parallel", {}).items():
    params(name, train_sae(data["x"], cfg(c), target=data.get("y") if c.get("skip") else None, parallel="data"))

if "kill" in args:  # both ranks stop after `stop` steps (rank 0 has checkpointed at step 20)
    steps = [0]
    def stop(opt, a, kw):
        steps[0] += 1
        if steps[0] == args["kill"]["stop"]:
            raise KeyboardInterrupt
    handle = register_optimizer_step_post_hook(stop)
    try:
        train_sae(data["x"], cfg(args["kill"]["config"]), parallel="data")
    except KeyboardInterrupt:
        report["killed"] = steps[0]
    handle.remove()

if "resume" in args:
    params("resumed", train_sae(data["x"], cfg(args["resume"]), parallel="data"))
    try:  # rank 0 refuses the checkpoint for another config: every rank raises its error
        train_sae(data["x"], replace(cfg(args["resume"]), lr=0.02), parallel="data")
    except CheckpointError as e:
        report["refused"] = str(e)

if "layers" in args:
    jobs = {n: data[f"x_{n}"] for n in args["layers"]["names"]}
    targets = {n: data[f"y_{n}"] for n in args["layers"]["names"] if f"y_{n}" in data}
    for n, res in train_saes(jobs, {n: cfg(c) for n, c in args["layers"]["configs"].items()}, targets=targets,
                             parallel="layers").items():
        params(n, res)

if "layers_fail" in args:  # job "b" (rank 1's) cannot train: every rank raises, naming it
    c = cfg(args["layers_fail"])
    try:
        train_saes({"a": data["x"], "b": data["x"]}, {"a": c, "b": replace(c, architecture="topk")},
                   parallel="layers")
    except RuntimeError as e:
        report["layers_fail"] = str(e)

if "mismatch" in args:  # rank 1 asks for another learning rate: every rank refuses
    c = cfg(args["mismatch"])
    try:
        train_sae(data["x"], c if rank == 0 else replace(c, lr=c.lr * 2), parallel="data")
    except ValueError as e:
        report["mismatch"] = str(e)

report["written"] = written
save_file(out, args["out"] % rank)
with open(args["report"] % rank, "w") as f:
    json.dump(report, f)
"""


def synthetic(n: int, d_in: int = 16, n_dirs: int = 32, k: int = 3, seed: int = 0) -> torch.Tensor:
    """``x [n, d_in]``: sums of ~``k`` of ``n_dirs`` known unit directions with magnitudes in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_dirs, generator=g) < k / n_dirs
    return (active * (0.5 + torch.rand(n, n_dirs, generator=g))) @ dirs


def base_cfg(**kw: object) -> TrainConfig:
    """30 steps of a global batch of 63 rows (slices of 31 and 32 rows on 2 ranks); the recipe in full:
    scaling, b_dec init at the mean, λ warm-up and target_l0, LR warm-up and decay."""
    base: dict = dict(d_sae=32, lr=1e-2, steps=30, batch_size=63, scale_batches=4, lr_warmup_steps=5,
                      lr_decay_frac=0.2, log_every=5, b_dec_init="mean", target_l0=3.0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def launch(tmp_path: Path, tag: str, data: dict[str, torch.Tensor], **args: object
           ) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:  # fmt: skip
    """Run the child script on 2 gloo ranks; each rank's saved parameters and report."""
    save_file(data, str(tmp_path / f"{tag}-data.safetensors"))
    spec = {"data": str(tmp_path / f"{tag}-data.safetensors"), "out": str(tmp_path / f"{tag}-out%d.safetensors"),
            "report": str(tmp_path / f"{tag}-report%d.json"), **args}  # fmt: skip
    procs = run_ranks(_CHILD, 2, json.dumps(spec))
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank}:\n{proc.stderr[-4000:]}"
    return ([load_file(spec["out"] % r) for r in range(2)],
            [json.loads(Path(spec["report"] % r).read_text()) for r in range(2)])  # fmt: skip


def cfg_json(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def max_rel_diff(got: dict[str, torch.Tensor], name: str, want: TrainResult) -> float:
    """The largest ``max |got - want| / max |want|`` over ``want``'s parameters."""
    worst = 0.0
    for key, p in want.sae.named_parameters():
        g = got[f"{name}.{key}"]
        worst = max(worst, float((g - p).abs().max() / p.abs().max().clamp_min(1e-30)))
    return worst


X = synthetic(1200, seed=3)
Y = torch.relu(X @ torch.randn(16, 24, generator=torch.Generator().manual_seed(1)))
CASES = {
    "jumprelu": base_cfg(),
    "topk": base_cfg(architecture="topk", k=4, target_l0=None),
    "transcoder": base_cfg(skip=True, l0_coefficient=0.01, target_l0=None),
}
LAYER_XS = {"blocks.0.resid_post": synthetic(700, seed=1), "blocks.1.resid_post": synthetic(700, d_in=12, seed=2),
            "blocks.2.ln2_normalized": synthetic(700, seed=4)}  # fmt: skip
LAYER_Y = torch.relu(LAYER_XS["blocks.2.ln2_normalized"]
                     @ torch.randn(16, 20, generator=torch.Generator().manual_seed(5)))  # fmt: skip
LAYER_CONFIGS = {
    "blocks.0.resid_post": base_cfg(steps=20, site="blocks.0.resid_post"),
    "blocks.1.resid_post": base_cfg(steps=20, architecture="topk", k=3, target_l0=None, seed=7),
    "blocks.2.ln2_normalized": base_cfg(steps=20, skip=True, target_l0=None, output_site="blocks.2.mlp_out",
                                        site="blocks.2.ln2_normalized"),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two launches of 2 gloo ranks (each process pays torch's and the optimiser's import once): (a) the
    data-parallel cases and a checkpointed run stopped after 25 steps, (b) that run resumed, a mismatched
    config, and the layer placement. Their saved parameters and reports, and the folders."""
    tmp = tmp_path_factory.mktemp("ranks")
    ckpt = base_cfg(checkpoint_dir=str(tmp / "ckpt"), checkpoint_every=10)
    a = launch(tmp, "a", {"x": X, "y": Y}, data_parallel={n: cfg_json(c) for n, c in CASES.items()},
               kill={"stop": 25, "config": cfg_json(ckpt)})  # fmt: skip
    after_a = sorted(p.name for p in (tmp / "ckpt").iterdir())
    shutil.copytree(tmp / "ckpt", tmp / "ckpt-single")
    data_b = {"x": X} | {f"x_{n}": x for n, x in LAYER_XS.items()} | {"y_blocks.2.ln2_normalized": LAYER_Y}
    b = launch(tmp, "b", data_b, resume=cfg_json(ckpt), mismatch=cfg_json(base_cfg(steps=2)),
               layers_fail=cfg_json(base_cfg(steps=2)),
               layers={"names": list(LAYER_XS), "configs": {n: cfg_json(c) for n, c in LAYER_CONFIGS.items()}})
    return {"a": a, "b": b, "after_a": after_a, "after_b": sorted(p.name for p in (tmp / "ckpt").iterdir()),
            "ckpt": ckpt, "tmp": tmp}  # fmt: skip


def test_data_parallel_training_equals_single_process_training(ranks: dict) -> None:
    """JumpReLU (λ warm-up, target_l0), TopK and a skip transcoder trained data-parallel on 2 ranks end with the
    parameters, scales and history of single-process training on the same global batches (within RTOL; the
    scales exactly), the same on both ranks."""
    outs, reports = ranks["a"]
    for name, cfg in CASES.items():
        single = train_sae(X, cfg, target=Y if cfg.skip else None)
        for rank in range(2):
            rel = max_rel_diff(outs[rank], name, single)
            print(f"{name} rank {rank}: max relative parameter difference {rel:.2e}")
            assert rel < RTOL, (name, rank, rel)
            rep = reports[rank][name]
            assert rep["scale"] == single.scale and rep["output_scale"] == single.output_scale
            assert rep["type"] == type(single.sae).__name__ and rep["metadata"] == single.sae.metadata
            for got, want in zip(rep["history"], single.history, strict=True):
                assert got["step"] == want["step"] and got["lr"] == want["lr"]
                for key in ("loss", "mse", "l0", "lambda"):
                    assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)
        for key in (k for k in outs[0] if k.startswith(f"{name}.")):
            assert torch.equal(outs[0][key], outs[1][key]), key  # the ranks hold one model


def test_data_parallel_checkpoints_on_rank_0_and_every_rank_resumes(ranks: dict) -> None:
    """A run stopped after 25 steps leaves rank 0's checkpoint of step 20 (one folder, written once); started
    again, both ranks resume from it and end bit-identical to the uninterrupted data-parallel run (parameters
    and history); one process resumes the same checkpoint too (the world size is not part of it); a rank with
    another config makes every rank refuse, naming the rank, and so does a checkpoint of another config."""
    outs, reports = ranks["a"]
    outs_b, reports_b = ranks["b"]
    assert reports[0]["killed"] == reports[1]["killed"] == 25
    assert reports[0]["written"] == [10, 20] and reports[1]["written"] == []  # rank 0 alone writes
    assert reports_b[0]["written"] == [30] and reports_b[1]["written"] == []
    assert ranks["after_a"] == ["step_00000020"] and ranks["after_b"] == ["step_00000030"]
    whole = {k.removeprefix("jumprelu."): v for k, v in outs[0].items() if k.startswith("jumprelu.")}
    for rank in range(2):
        assert reports_b[rank]["resumed"]["start_step"] == 20
        for key, v in whole.items():
            assert torch.equal(outs_b[rank][f"resumed.{key}"], v), (rank, key)
        assert reports_b[rank]["resumed"]["history"] == reports[0]["jumprelu"]["history"]
        assert "must be the same on every rank, but rank(s) [1] differ from rank 0" in reports_b[rank]["mismatch"]
        assert "step_00000030: checkpoint made with lr=0.01, this run has lr=0.02" in reports_b[rank]["refused"]
    single = train_sae(X, replace(ranks["ckpt"], checkpoint_dir=str(ranks["tmp"] / "ckpt-single")))
    assert single.start_step == 20 and max_rel_diff(outs[0], "jumprelu", single) < RTOL


def test_layers_placed_on_ranks_equal_each_trained_alone(ranks: dict) -> None:
    """Three jobs on 2 ranks (rank 0 trains two, rank 1 one; a transcoder among them): every rank returns all
    three results, each bit-identical to train_sae on that job alone in one process. A job failing on rank 1
    makes every rank raise, naming the job, the rank and the error."""
    outs, reports = ranks["b"]
    for rank in range(2):
        assert reports[rank]["layers_fail"] == ("train_saes(parallel='layers'): job 'b' failed on rank 1: "
                                                "ValueError: topk training needs 0 < k <= d_sae, got k=None")
    for name, cfg in LAYER_CONFIGS.items():
        alone = train_sae(LAYER_XS[name], cfg, target=LAYER_Y if cfg.skip else None)
        for rank in range(2):
            for key, p in alone.sae.named_parameters():
                assert torch.equal(outs[rank][f"{name}.{key}"], p), (name, rank, key)
            rep = reports[rank][name]
            assert rep["history"] == alone.history and rep["scale"] == alone.scale
            assert rep["type"] == type(alone.sae).__name__ and rep["site"] == alone.sae.site


def test_parallel_keywords_are_checked_and_plain_without_a_process_group() -> None:
    """Without a process group parallel="data"/"layers" are the single-process calls (bit-identical); an
    unknown mode is refused by name."""
    from saes.train import train_saes

    x = synthetic(300, seed=9)
    cfg = base_cfg(steps=5)
    plain = train_sae(x, cfg)
    assert all(torch.equal(a, b) for a, b in zip(train_sae(x, cfg, parallel="data").sae.parameters(),
                                                  plain.sae.parameters(), strict=True))  # fmt: skip
    both = train_saes({"a": x, "b": x}, replace(cfg), parallel="layers")
    assert list(both) == ["a", "b"] and torch.equal(both["b"].sae.W_enc, plain.sae.W_enc)
    with pytest.raises(ValueError, match=r"parallel must be None or 'data' .*got 'layers'"):
        train_sae(x, cfg, parallel="layers")
    with pytest.raises(ValueError, match=r"parallel must be None, 'data' or 'layers', got 'ranks'"):
        train_saes({"a": x}, cfg, parallel="ranks")
    with pytest.raises(ValueError, match=r"targets for jobs \['c'\] that have no data"):
        train_saes({"a": x}, cfg, targets={"c": x})
