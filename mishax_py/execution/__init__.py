"""How runs are executed beyond one forward: many variants batched (:mod:`.sweep`), the
Mishax-style loop over sites (:mod:`.walk`), and one forward with raw handlers (:mod:`.forward`)."""

from mishax_py.execution.sweep import default_batch_size, stacked_sweep, sweep
from mishax_py.execution.walk import Walker

__all__ = ["Walker", "default_batch_size", "stacked_sweep", "sweep"]
