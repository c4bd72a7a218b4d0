"""How runs are executed beyond one forward: many variants batched (:mod:`.sweep`) and the
Mishax-style loop over sites (:mod:`.walk`)."""

from mishax_py.execution.sweep import default_batch_size, sweep
from mishax_py.execution.walk import Walker

__all__ = ["Walker", "default_batch_size", "sweep"]
