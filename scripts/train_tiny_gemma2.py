#!/usr/bin/env python
"""Train the bundled tiny Gemma 2 (``mishax_py.zoo.load("gemma2-tiny")``) from scratch on CPU.

A real ``transformers.Gemma2ForCausalLM`` with every Gemma 2 feature switched on (GQA,
attention and final logit soft-caps, alternating sliding-window / global layers with a
window far smaller than the context, pre- and post-norms, tied embeddings), trained on a
mix of the two synthetic tasks in ``mishax_py.zoo.tasks``:

* induction: ``<bos> s1..sL s1..sL`` (L in 4..28), loss on ``s2..sL`` of the repeat;
* key-value recall: ``<bos> k1 v1 .. kn vn ? k_i`` -> ``v_i`` (n in 2..28).

Loss is next-token cross-entropy on the scored targets only (random tokens are not
predictable, so training on them would only teach the unigram prior). Each step draws
one length per task so rows need no padding (about 40% less compute than padding to
the maximum).

Two choices make this train in a few minutes on one shared CPU core (measured on
2-core machines under load; see the model card):

* curriculum: induction alone for the first ``--induction-only-steps`` steps, then
  both losses summed with equal weight. Mixing in the one-target-per-row recall task
  from the start delays the induction phase change by far more than the run length;
  once induction heads exist, recall is already solved at ~90% zero-shot (it uses the
  same circuit) and is polished in a few hundred steps;
* init: post-norm gains start at 0.1 instead of 1 (see ``init_weights``).

Everything is seeded (torch's global RNG for the init, a dedicated generator for the
data), runs single-process on the CPU with a fixed thread count, and the script ends
by measuring accuracy on *fresh* prompts (seeds never used for training data).

``--family gemma3`` trains the bundled tiny Gemma 3 (``load("gemma3-tiny")``) with the same
recipe, tasks and curriculum: a real ``transformers.Gemma3ForCausalLM`` with QK-norm, no
soft-caps, GQA, 6 layers in Gemma 3's 5:1 sliding/global pattern (layers 0-4 sliding with
window 8, layer 5 global; two RoPE bases, 10k local and 1M global), 1500 steps of which
600 induction-only. Every default that differs between the families is listed in
``FAMILY_DEFAULTS``; the Gemma 2 defaults are unchanged. Why window 8 and not 16: with
window 16, prompts with L <= 15 (half of them) are solved by the sliding layers first and
the model sat on that ~44% plateau (switching tasks at step 500: induction never left it;
induction-only until step 1200: induction reached 100% but recall stayed at ~64%, the
share of queries whose key lies inside the window). With window 8, the global layer is
needed for most prompts and both tasks reach 100%.

Usage::

    python scripts/train_tiny_gemma2.py                   # writes mishax_py/zoo/data/gemma2-tiny/
    python scripts/train_tiny_gemma2.py --family gemma3   # writes mishax_py/zoo/data/gemma3-tiny/
    python scripts/train_tiny_gemma2.py --out /tmp/g2 --steps 200   # quick try
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from mishax_py.zoo import tasks  # noqa: E402
from mishax_py.zoo.models import build_tokenizer  # noqa: E402

DATA_ROOT = ROOT / "mishax_py" / "zoo" / "data"
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM}
# Defaults that differ by family (None in argparse = take the family's value). Gemma 2's are the
# values the bundled gemma2-tiny was trained with.
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "gemma2": {"n_layers": 4, "window": 8, "steps": 1200, "induction_only_steps": 500, "qk_norm_gain": 1.0},
    "gemma3": {"n_layers": 6, "window": 8, "steps": 1500, "induction_only_steps": 600, "qk_norm_gain": 1.0},
}
DATA_SEED_OFFSET = 1_000_003  # training data seeds differ from every evaluation seed used elsewhere
EVAL_SEED = 777  # monitoring during training
FINAL_SEEDS = (2024, 4242)  # fresh prompts for the final report (tests use others still)


def make_config(args: argparse.Namespace) -> PretrainedConfig:
    """The tiny config of ``args.family``.

    Gemma 2: 4 layers alternating sliding (even) / global (odd), GQA 4:2, soft-caps 50/30.
    Gemma 3: 6 layers, Gemma 3's 5:1 pattern (every 6th layer global), QK-norm, no soft-caps,
    GQA 4:2, RoPE bases 10k (sliding) / 1M (global).
    """
    if args.family == "gemma3":
        g3 = Gemma3TextConfig(
            vocab_size=tasks.VOCAB_SIZE,
            hidden_size=args.d_model,
            intermediate_size=args.d_mlp,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            num_key_value_heads=args.n_kv_heads,
            head_dim=args.d_head,
            max_position_embeddings=args.context,
            sliding_window=args.window,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(args.n_layers)],
            query_pre_attn_scalar=args.d_head,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tasks.PAD_ID,
            eos_token_id=tasks.EOS_ID,
            bos_token_id=tasks.BOS_ID,
            initializer_range=0.02,
            use_cache=True,
        )
        if "full_attention" not in g3.layer_types:
            raise ValueError(f"--n-layers {args.n_layers}: Gemma 3's 5:1 pattern needs >= 6 layers for a global one")
        g3._attn_implementation = "eager"
        return g3
    cfg = Gemma2Config(
        vocab_size=tasks.VOCAB_SIZE,
        hidden_size=args.d_model,
        intermediate_size=args.d_mlp,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.d_head,
        max_position_embeddings=args.context,
        sliding_window=args.window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.n_layers)],
        query_pre_attn_scalar=args.d_head,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tasks.PAD_ID,
        eos_token_id=tasks.EOS_ID,
        bos_token_id=tasks.BOS_ID,
        initializer_range=0.02,
        use_cache=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def init_weights(model: PreTrainedModel, args: argparse.Namespace) -> None:
    """Adjust HF's default init so the token signal is not drowned at step 0.

    Gemma 2's post-norms rescale every attention/MLP output to unit RMS before it is
    added to the residual, while the embeddings (std 0.02, times sqrt(d_model)) start
    at RMS ~0.2: at init each layer would add 4x more noise than there is token
    identity. Starting the post-norm gains ``(1 + w)`` small and the embeddings at
    unit-ish RMS lets the previous-token and induction heads form much sooner. Gemma 3
    has the same post-norms; its q/k norms start at gain ``--qk-norm-gain`` (default 1, HF's
    init; starting at 2.5 was tried and delayed the induction phase change).
    """
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, args.embed_std)
        emb[tasks.PAD_ID].zero_()
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(args.post_norm_gain - 1.0)
            layer.post_feedforward_layernorm.weight.fill_(args.post_norm_gain - 1.0)
            for qk in ("q_norm", "k_norm"):  # Gemma 3's QK-norm (Gemma 2 has none)
                if hasattr(layer.self_attn, qk):
                    getattr(layer.self_attn, qk).weight.fill_(args.qk_norm_gain - 1.0)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def task_loss(model: PreTrainedModel, batch: tasks.TaskBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's scored targets (scalar)."""
    return model(input_ids=batch.input_ids, labels=batch.labels).loss


def evaluate(model: PreTrainedModel, seed: int, n: int, max_len: int = 24) -> tuple[float, float]:
    """(induction accuracy, recall accuracy) on ``n`` fresh prompts each, lengths up to ``max_len``."""
    was_training = model.training
    model.eval()
    ind = tasks.induction_accuracy(model, n, seed=seed, max_len=max_len)
    rec = tasks.recall_accuracy(model, n, seed=seed + 1, max_pairs=max_len)
    model.train(was_training)
    return ind, rec


def train(args: argparse.Namespace) -> tuple[PreTrainedModel, dict]:
    """Build and train the model; returns it with a dict of training facts for the model card."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = MODEL_CLASSES[args.family](make_config(args))
    init_weights(model, args)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    g = torch.Generator().manual_seed(args.seed + DATA_SEED_OFFSET)
    t0, c0 = time.time(), time.process_time()
    log = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        L = int(torch.randint(4, args.train_max_len + 1, (1,), generator=g))
        P = int(torch.randint(2, args.train_max_pairs + 1, (1,), generator=g))
        ind = tasks.induction_batch(args.batch_size, seq_len=L, generator=g)
        rec = tasks.recall_batch(args.batch_size, n_pairs=P, generator=g)
        loss_i = task_loss(model, ind)
        if step >= args.induction_only_steps:
            loss_r = task_loss(model, rec)
            loss = loss_i + loss_r
        else:  # the recall batch is still drawn, so the data stream does not depend on the curriculum
            loss_r = torch.tensor(float("nan"))
            loss = loss_i
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc_i, acc_r = evaluate(model, EVAL_SEED, args.eval_n)
            elapsed = time.time() - t0
            log.append({"step": step + 1, "induction": acc_i, "recall": acc_r, "seconds": round(elapsed, 1)})
            print(
                f"step {step + 1:5d}  loss ind {loss_i.item():.3f} rec {loss_r.item():.3f}  "
                f"acc ind {acc_i:.3f} rec {acc_r:.3f}  lr {lr_at(step, args):.2e}  {elapsed:6.1f}s",
                flush=True,
            )
    facts = {
        "train_seconds": round(time.time() - t0, 1),
        "train_cpu_seconds": round(time.process_time() - c0, 1),
        "log": log,
    }
    return model, facts


@torch.no_grad()
def mechanism_report(model: PreTrainedModel, n: int = 256, half_len: int = 20) -> dict:
    """Measure where the circuits live, for the model card.

    Per head (attention maps ``[n, head, q, k]`` from eager attention), averaged over the
    repeated half of induction prompts with ``L = half_len`` (the earlier copy is beyond
    the sliding window): ``prev`` = attention to the previous position, ``induction`` =
    attention to the token after the earlier copy, ``bos`` = attention to ``<bos>``.
    Per layer, the accuracy left after zero-ablating all of its heads (their slice of the
    ``o_proj`` input) on fresh induction and recall prompts.
    """
    was_training = model.training
    model.eval()
    L = half_len
    ind = tasks.induction_batch(n, seq_len=L, seed=31)
    attn = model(input_ids=ind.input_ids, output_attentions=True).attentions
    q = torch.arange(L + 1, 2 * L + 1)
    heads = []
    for layer, a in enumerate(attn):
        for h in range(a.shape[1]):
            heads.append({
                "layer": layer,
                "head": h,
                "prev": round(a[:, h, q, q - 1].mean().item(), 3),
                "induction": round(a[:, h, q, q - L + 1].mean().item(), 3),
                "bos": round(a[:, h, q, 0].mean().item(), 3),
            })
    ind_eval, rec_eval = tasks.induction_batch(n, seed=32), tasks.recall_batch(n, seed=33)
    ablations = []
    for layer, block in enumerate(model.model.layers):
        hook = block.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
        try:
            ablations.append({
                "layer": layer,
                "induction": round(tasks.batch_accuracy(model, ind_eval), 3),
                "recall": round(tasks.batch_accuracy(model, rec_eval), 3),
            })
        finally:
            hook.remove()
    model.train(was_training)
    return {"heads": heads, "layer_ablations": ablations, "half_len": L}


def model_card(cfg: PretrainedConfig, facts: dict, argv: list[str] | None) -> str:
    """Markdown model card: config, tasks, expected mechanisms, command and measured accuracies."""
    cmd = " ".join(["python scripts/train_tiny_gemma2.py", *(sys.argv[1:] if argv is None else argv)])
    acc_rows = "\n".join(
        f"| {seed} | {v['induction']:.4f} | {v['recall']:.4f} |" for seed, v in facts["final_accuracy"].items()
    )
    n_params = facts["n_params"]
    mech = facts["mechanism"]
    head_rows = "\n".join(
        f"| {r['layer']} | {r['head']} | {cfg.layer_types[r['layer']]} | {r['prev']:.2f} | {r['induction']:.2f} "
        f"| {r['bos']:.2f} |"
        for r in mech["heads"]
    )
    abl_rows = "\n".join(
        f"| {r['layer']} | {r['induction']:.3f} | {r['recall']:.3f} |" for r in mech["layer_ablations"]
    )
    a = facts["args"]
    cpu = facts.get("train_cpu_seconds")
    cpu_note = f" ({cpu:.0f} s of CPU time: the machine was shared)" if cpu else ""
    gemma3 = cfg.model_type == "gemma3_text"
    global_layers = ", ".join(str(i) for i, t in enumerate(cfg.layer_types) if t == "full_attention")
    name, cls = ("gemma3-tiny", "Gemma3ForCausalLM") if gemma3 else ("gemma2-tiny", "Gemma2ForCausalLM")
    softcaps = f"attention {cfg.attn_logit_softcapping}, final {cfg.final_logit_softcapping}"
    norms = "input, post-attention, pre-feedforward, post-feedforward, final"
    rope = ""
    if gemma3:
        norms += "; QK-norm (`q_norm`, `k_norm` per head, before RoPE)"
        bases = {k: v.get("rope_theta") for k, v in (cfg.rope_parameters or {}).items()}
        rope = f"\n| RoPE bases | {bases} |"
    return f"""# {name}

A real `transformers.{cls}`, trained from scratch on two synthetic tasks with
known mechanisms, bundled with mishax-py so every tool has something true to find.
Load it offline with `mishax_py.zoo.load("{name}")`.

## Config

| field | value |
|---|---|
| layers | {cfg.num_hidden_layers}: `{cfg.layer_types}` |
| sliding window | {cfg.sliding_window} (context `max_position_embeddings` {cfg.max_position_embeddings}) |
| d_model / d_mlp | {cfg.hidden_size} / {cfg.intermediate_size} (`{cfg.hidden_activation}`) |
| heads | {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads (GQA), head_dim {cfg.head_dim} |
| query_pre_attn_scalar | {cfg.query_pre_attn_scalar} |
| soft-caps | {softcaps} |
| norms | RMSNorm `(1 + w)`: {norms} |{rope}
| vocab | {cfg.vocab_size} (word level), tied embeddings |
| parameters | {n_params:,} (fp32 safetensors) |
| attention | stored with `attn_implementation="eager"` (needed for the soft-cap and patterns) |

## Vocabulary

`<pad>`=0, `<eos>`=1, `<bos>`=2 (prepended by the tokenizer), `<unk>`=3, `?`=4 (query
marker), `k0..k63`=5..68 (keys), `v0..v63`=69..132 (values). Words are whitespace-separated:
`tok("k1 v2 ? k1")` gives `[2, 6, 71, 4, 6]`.

## Tasks (generators in `mishax_py.zoo.tasks`)

* **Induction** (`induction_batch`): `<bos> s1..sL s1..sL`, `s` distinct random content
  tokens (any of `k*`/`v*`), L in 4..24 for evaluation (4..28 in training). Scored on the
  repeat from `s2` on. Expected circuit: previous-token heads in a sliding layer and
  induction heads in the global layer(s); for L > {cfg.sliding_window - 1} the earlier copy is outside the
  sliding window, so only the global layers ({global_layers}) can reach it.
* **Key-value recall** (`recall_batch`): `<bos> k1 v1 .. kn vn ? k_i` -> `v_i`, n in 2..24
  (2..28 in training), distinct keys. Scored on the answer. Expected circuit: the same
  previous-token -> induction-head path (the value's position stores its key; the query
  key attends to it and copies the value).
* Patching pairs: `induction_clean_corrupt` (first half re-randomised: the repeat becomes
  unpredictable) and `recall_clean_corrupt` (a different query key: the answer changes).

## Training

```
{cmd}
```

Seeded (`torch.manual_seed({a['seed']})`, data generator seed + {DATA_SEED_OFFSET}), {a['threads']} CPU
thread(s), deterministic algorithms: re-running (same torch build and thread count) gives
bit-identical weights. {a['steps']} AdamW steps (lr {a['lr']}, warm-up {a['warmup']}, cosine to 10%,
batch {a['batch_size']} rows per task), induction only for the first {a['induction_only_steps']}
steps, then both tasks. Training took {facts['train_seconds']:.0f} s wall clock{cpu_note}.

## Measured accuracy (fresh prompts, greedy next token, 2048 prompts per task and seed)

| seed | induction (L 4..24) | recall (2..24 pairs) |
|---|---|---|
{acc_rows}

## Mechanism (measured by `mechanism_report` in the training script)

Attention from the repeated half of induction prompts (L = {mech['half_len']}, so the earlier
copy is {mech['half_len'] + 1} positions back, beyond the sliding window of {cfg.sliding_window}):
`prev` = to the previous position, `induction` = to the token after the earlier copy,
`bos` = to `<bos>` (a resting head).

| layer | head | type | prev | induction | bos |
|---|---|---|---|---|---|
{head_rows}

Accuracy left after zero-ablating every head of one layer (fresh prompts):

| layer ablated | induction | recall |
|---|---|---|
{abl_rows}

Heads in one layer are largely redundant (removing a single head barely matters); with
GQA, query heads 2h and 2h+1 share KV head h.

`training_facts.json` holds the arguments, the evaluation log and these measurements.
"""


def rewrite_card(out: Path) -> None:
    """Reload the saved model in ``out``, re-measure its mechanism and rewrite README.md and the facts."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", local_files_only=True)
    facts = json.loads((out / "training_facts.json").read_text())
    facts["mechanism"] = mechanism_report(model)
    (out / "training_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "README.md").write_text(model_card(model.config, facts, facts.get("argv", [])))
    print(f"rewrote {out / 'README.md'}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, report fresh-seed accuracies and save model + tokenizer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(MODEL_CLASSES), default="gemma2",
                   help="gemma2 (the bundled gemma2-tiny) or gemma3 (gemma3-tiny)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (save_pretrained); default mishax_py/zoo/data/<family>-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default 1200 (gemma2) / 1500 (gemma3)")
    p.add_argument("--induction-only-steps", type=int, default=None,
                   help="curriculum: train on induction alone first, then on both tasks; default 500 / 600")
    p.add_argument("--batch-size", type=int, default=16, help="rows per task per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU, reproducible)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--train-max-len", type=int, default=28, help="longest induction half-length in training")
    p.add_argument("--train-max-pairs", type=int, default=28, help="most recall pairs in training")
    p.add_argument("--n-layers", type=int, default=None, help="default 4 (gemma2) / 6 (gemma3)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-mlp", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--context", type=int, default=64, help="max_position_embeddings")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window of the local layers; default 8 (gemma2) / 16 (gemma3)")
    p.add_argument("--embed-std", type=float, default=0.05, help="init std of the (tied) embeddings")
    p.add_argument("--post-norm-gain", type=float, default=0.1, help="initial (1 + w) of the post-norms")
    p.add_argument("--qk-norm-gain", type=float, default=None,
                   help="initial (1 + w) of Gemma 3's q/k norms (default 1: HF's init; unused for gemma2)")
    p.add_argument("--no-save", action="store_true", help="train and report only")
    p.add_argument("--card-only", action="store_true",
                   help="no training: re-measure the mechanism of the model in --out and rewrite its README.md")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DATA_ROOT / f"{args.family}-tiny"
    for key, value in FAMILY_DEFAULTS[args.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.card_only:
        rewrite_card(args.out)
        return
    if 2 * max(args.train_max_len, args.train_max_pairs) + 4 > args.context:
        p.error("training sequences must fit in --context")

    model, facts = train(args)
    model.eval()
    final = {}
    for seed in FINAL_SEEDS:
        ind, rec = evaluate(model, seed, 2048)
        final[str(seed)] = {"induction": ind, "recall": rec}
        print(f"fresh seed {seed}: induction {ind:.4f}  recall {rec:.4f}  (2048 prompts each, lengths 4..24)")
    facts["final_accuracy"] = final
    facts["n_params"] = sum(p.numel() for p in model.parameters())
    facts["mechanism"] = mechanism_report(model)
    facts["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    facts["argv"] = list(sys.argv[1:] if argv is None else argv)
    print(f"trained in {facts['train_seconds']:.1f}s")
    if args.no_save:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tasks.PAD_ID
    model.save_pretrained(args.out, safe_serialization=True)
    build_tokenizer().save_pretrained(args.out)
    (args.out / "training_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(model.config, facts, argv))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
