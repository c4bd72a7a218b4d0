"""Studies across processes: ``with mishax_py.distributed.split():`` splits their work over torch.distributed.

Launch the same script on every rank (``torchrun --nproc-per-node 2 script.py``, or ``accelerate launch``),
initialise the process group (gloo on CPU, NCCL on GPUs), and run the studies inside ``split()``::

    import torch.distributed as dist
    import mishax_py.distributed as mdist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with mdist.split():
        grid = activation_patching(im, clean, corrupt, metric, site="attn.z")   # every rank: the whole grid

What each study splits (items dealt ``rank, rank + world, ...``; every rank gets the whole result):

* ``im.sweep``: the variants (``grad=True`` cannot split: gradients do not cross ranks; it raises).
* ``activation_patching``: the patches left after the shared base and source runs (both engines).
* ``attribution_patching``: ``"atp*"``/GradDrop the ``1 + n_layers`` replicas; ``"atp-layer"`` the patched
  elements; ``"ig"`` the ``layers x steps`` interpolations; ``"ig-input"`` the steps. Plain ``"atp"`` (with or
  without the QK fix) is one forward and one backward: every rank runs it whole, with no communication.
* ``path_patching_by_head``: the sender heads (steps 2 and 3 of each).
* ``mishax_py.circuits.attribution_graphs``: the prompts (every rank receives every graph).

The base runs a study shares (clean and corrupt caches) run on every rank. The process management is
torch.distributed's; this package only splits work inside an initialised group.
"""

from mishax_py.distributed.context import Share, Split, active_split, split, unsplit

__all__ = ["Share", "Split", "active_split", "split", "unsplit"]
