"""palaestra: a gym and trainer for tool-use language-model agents.

Sub-packages (each a top-level folder of the repository):

- ``palaestra.envs``: Gymnasium text environments, their registry and checker.
- ``palaestra.agent``: the policy side: engines, chat rendering, rollouts.
- ``palaestra.trainer``: batches, advantages, losses, the learner and stage loops.
- ``palaestra.sandboxes``: isolated code execution.

This top package holds the CLI, config loading, model loading and the run directory.
"""

__version__ = "0.1.0"
