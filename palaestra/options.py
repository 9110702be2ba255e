"""The closed option sets of palaestra, each spelled once.

Every name a config may choose (a stage, an engine, a loss, an aggregation, ...) is a
``Literal`` here; the config sections, the losses and the stage code import it from this
module, and the tuples beside them (``get_args``) serve the run-time checks of functions
called without a config. A new option is added here first, then where it is implemented.

This module imports nothing from palaestra, so every layer may import it.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelName = Literal["smollm2-135m", "tiny-random"]
"""Models ``palaestra.models.resolve_model`` builds from the embedded GGUF; any other
``model`` is a local Hugging Face model directory."""
KNOWN_MODELS: tuple[str, ...] = get_args(ModelName)

Stage = Literal["sft", "dpo", "reward_model", "grpo", "ppo", "online_dpo"]
"""Training stages (``palaestra.trainer.stages``)."""
STAGES: tuple[str, ...] = get_args(Stage)

DATASET_STAGES: tuple[str, ...] = ("sft", "dpo", "reward_model")
"""Stages that train on a JSON-lines dataset."""
ON_POLICY_STAGES: tuple[str, ...] = ("grpo", "ppo", "online_dpo")
"""Stages that train on the model's own rollouts in an env."""

EngineKind = Literal["transformers", "vllm", "openai"]
"""Rollout engines (``palaestra.agent.engines``)."""

DType = Literal["auto", "float32", "bfloat16"]
"""Precision choices; ``auto`` resolves per device (``palaestra.models.Precision``)."""
DTYPES: tuple[str, ...] = get_args(DType)
ResolvedDType = Literal["float32", "bfloat16"]
"""A precision after ``auto`` is resolved."""

Advantage = Literal["grpo", "rloo", "reinforce_pp"]
"""How rewards become advantages (``trainer.advantages``)."""
ADVANTAGES: tuple[str, ...] = get_args(Advantage)

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
"""How per-token policy losses become one number (``trainer.losses.policy_loss``)."""
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

KLEstimator = Literal["k1", "k2", "k3"]
"""Schulman's per-token KL estimators."""
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

KLPlacement = Literal["reward", "loss"]
"""Where the KL to the reference goes."""

RatioLevel = Literal["token", "sequence"]
"""Importance ratio per token (GRPO, DAPO) or per sequence (GSPO)."""
RATIO_LEVELS: tuple[str, ...] = get_args(RatioLevel)

ImportanceSampling = Literal["off", "token", "sequence"]
"""Correction for the engine that sampled: off, or truncated weights per token/sequence."""
ISLevel = Literal["token", "sequence"]
"""The levels at which behaviour weights are computed (``ImportanceSampling`` but ``off``)."""
IS_LEVELS: tuple[str, ...] = get_args(ISLevel)

TurnCredit = Literal["episode", "return_to_go"]
"""How multi-turn episodes credit their turns."""

PreferenceLossName = Literal["sigmoid", "ipo", "simpo", "orpo"]
"""Pairwise preference losses (``trainer.losses.PREFERENCE_LOSSES``)."""
PREFERENCE_LOSS_NAMES: tuple[str, ...] = get_args(PreferenceLossName)

DPOLoss = Literal["sigmoid", "ipo", "kto", "simpo", "orpo"]
"""``dpo.loss``: the pairwise losses and KTO (unpaired answers)."""

LearnedRewardMode = Literal["replace", "add"]
"""How a learned reward combines with the env's."""
