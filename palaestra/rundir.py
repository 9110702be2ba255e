"""The run directory: everything a run writes, in one folder.

::

    runs/<name>/
      config.yaml         the resolved config (after overrides)
      metrics.jsonl       one JSON object per step and per evaluation
      events.*            TensorBoard events of the same scalars
      trajectories.jsonl  sampled episodes (text, reward, stop reason) for reading
      curves.png          reward and accuracy over training
      checkpoints/        Hugging Face checkpoints (``final`` at the end) and training
                          states (``state-<step>``, ``trainer.train_state``)

A resumed run reopens its directory (``RunDir.reopen``) at the step its training state was
saved after: records of later steps, which the resumed run writes again, are dropped from
``metrics.jsonl`` and ``trajectories.jsonl`` (with any line a kill cut short), and
TensorBoard purges its later events, so every step is logged exactly once.

What this module does not do: decide what to log (the stage loops call ``log``), or save
and read training states.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml


class RunDir:
    """Creates a run directory and writes metrics, trajectories and plots into it."""

    def __init__(
        self, root: Path, config: dict[str, Any], *, resume_step: int | None = None
    ) -> None:
        """A new directory ``root``; with ``resume_step``, the existing one, continued after
        that step (``reopen``)."""
        self.root = root
        self.resumed_step = resume_step
        """The step a resumed run continues after (None: a new run)."""
        self.root.mkdir(parents=True, exist_ok=resume_step is not None)
        (self.root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.history: list[dict[str, Any]] = []
        if resume_step is not None:
            self.history = _keep_until(self.root / "metrics.jsonl", resume_step)
            _keep_until(self.root / "trajectories.jsonl", resume_step)
        self._metrics = (self.root / "metrics.jsonl").open("a")
        self._trajectories = (self.root / "trajectories.jsonl").open("a")
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(log_dir=str(self.root), purge_step=purge)

    @classmethod
    def reopen(cls, root: Path, config: dict[str, Any], step: int) -> RunDir:
        """The existing run directory ``root``, continued after ``step``: later records are
        dropped and ``config.yaml`` is rewritten with ``config``."""
        if not (root / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{root} is not a run directory (it has no metrics.jsonl)")
        return cls(root, config, resume_step=step)

    @classmethod
    def create(cls, output_dir: Path, name: str, config: dict[str, Any]) -> RunDir:
        """A new run directory ``output_dir/name``, suffixed with a counter if taken."""
        root, n = output_dir / name, 1
        while root.exists():
            n += 1
            root = output_dir / f"{name}-{n}"
        return cls(root, config)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Append one record to ``metrics.jsonl`` and TensorBoard."""
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.history.append(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(f"{kind}/{name}", value, step)

    def log_trajectories(
        self, step: int, trajectories: list[Any], decode: Any, kind: str = "train"
    ) -> None:
        """Write episodes readably: the full text, reward, components and stop reason."""
        for t in trajectories:
            record = {
                "kind": kind,
                "step": step,
                "env_id": t.env_id,
                "task_id": t.task_id,
                "group_id": t.group_id,
                "reward": t.reward,
                "reward_components": t.reward_components,
                "stop_reason": t.stop_reason.value,
                "policy_version": t.policy_version,
                "turn_policy_versions": list(t.turn_policy_versions),
                "segment_starts": list(t.segment_starts),
                "text": decode(list(t.token_ids)),
                "turns": [asdict(turn) for turn in t.turns],
            }
            self._trajectories.write(json.dumps(record) + "\n")
        self._trajectories.flush()

    def plot(self) -> Path:
        """Draw mean reward per step and evaluation accuracy to ``curves.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.history if r["kind"] == "train" and "reward_mean" in r]
        evals = [r for r in self.history if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="train reward")
        if evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["accuracy"] for r in evals],
                "o--",
                label="held-out accuracy",
            )
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.root / "curves.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def close(self) -> None:
        self._metrics.close()
        self._trajectories.close()
        self._tb.close()


def _keep_until(path: Path, step: int) -> list[dict[str, Any]]:
    """Rewrite the JSON-lines log ``path`` with only its records up to ``step`` (a line a
    kill cut short is dropped too); returns them."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(record)
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def write_text_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``<path>.partial``, make it durable, rename it to ``path`` and make
    the rename durable: after a crash ``path`` holds the old text or the new, never a part."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_path(path.parent)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
