"""The trainer: batches, advantages, losses, the learner, weight sync and the stage loops.

Where things go:

- **A new algorithm that learns from rollouts** (a GRPO variant, a new RL objective): an
  update object in its stage module (``stages/<name>.py``) implementing
  ``stages.onpolicy.PolicyUpdate`` (``__call__(trajectories) -> metrics`` and
  ``finish(run)``), built from the loaded ``Policy``; ``run_on_policy`` runs it. Shared
  policy-gradient wiring (loss settings, KL in the reward, the behaviour correction) is in
  ``policy_gradient.py``.
- **A new stage trained on a dataset**: a module in ``stages/`` that fills in the dataset
  loop of ``stages/dataset.py``.
- **Either kind of stage**: its config class in ``palaestra.config`` (one member of the
  ``stage`` union, with the sections it reads), its name in ``palaestra.options.Stage``,
  and its ``run_<name>`` in ``palaestra.pipeline``'s table. No stage imports another.
- **A new loss**: a pure function in ``losses/`` (tensors in, ``(loss, metrics)`` out,
  under 60 lines, tested by hand and against a reference); a pairwise preference loss is
  registered in ``losses.PREFERENCE_LOSSES``.
- **A new model to optimise** (a critic, a reward model): the one ``Learner`` with its own
  ``forward``; micro-batching, warm-up, clipping and precision come with it.
- **The policy and its reference**: a stage loads its policy with
  ``stages.common.load_policy`` (LoRA-wrapped when the stage sets ``lora``) and takes its
  reference from ``stages.common.reference_policy`` (a frozen copy, or with LoRA the
  policy with its adapters off: ``adapters.py``), never ``load_model`` and a copy itself.
- **A new engine**: ``palaestra.agent.engines`` (the ``Engine`` protocol) and its name in
  ``agent.engines.build``; stages get it through ``stages.common.open_engine``.
"""
