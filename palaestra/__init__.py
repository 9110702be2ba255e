"""palaestra: a gym and trainer for tool-use language-model agents.

Sub-packages (each a top-level folder of the repository):

- ``palaestra.envs``: Gymnasium text environments, their registry and checker.
- ``palaestra.agent``: the policy side: engines, chat rendering, rollouts.
- ``palaestra.trainer``: batches, advantages, losses, the learner and stage loops.
- ``palaestra.sandboxes``: isolated code execution.

This top package holds the CLI, config loading, model loading and the run directory.
"""

import os

__version__ = "0.1.0"

# oneDNN (torch's CPU kernels) caches one primitive per distinct shape, up to 1024 by
# default. Rollouts produce a new shape at almost every decode step and training batch,
# and on CPU that cache alone grew the resident set by gigabytes over a run. A small cache
# keeps memory flat at no measured cost in speed. Set the variable yourself to override.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
