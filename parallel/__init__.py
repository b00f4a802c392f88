"""Topology, the two engines, checkpoints, the run-dir lease, the watchdog and the planner's model.

Importing the package defers megatron-core's ``torch.compile`` decorations to their first call
(:mod:`parallel.lazy_fusions`): every process starts seconds sooner.
"""

from parallel.lazy_fusions import install as _defer_megatron_fusions

_defer_megatron_fusions()
