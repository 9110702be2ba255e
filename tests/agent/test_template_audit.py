"""Template audit: SmolLM2's verdicts, and a template that rewrites history."""

from __future__ import annotations

import subprocess
import sys

from palaestra.agent.template_audit import audit_template


def verdicts(tokenizer) -> dict[str, bool]:
    return {check.name: check.passed for check in audit_template(tokenizer)}


def test_smollm2_template_extends_turns_but_ignores_tools(tokenizer):
    assert verdicts(tokenizer) == {
        "generation prompt": True,
        "end of turn": True,
        "prefix extension": True,
        "tools in prompt": False,  # SmolLM2's ChatML template has no tools block
        "history kept": True,
    }


def test_a_template_that_strips_reasoning_fails_prefix_and_history(tokenizer):
    stripping = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    stripping.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    result = verdicts(stripping)
    assert result["prefix extension"] is False and result["history kept"] is False
    assert result["generation prompt"] is True


def test_audit_template_command_prints_a_verdict_per_check():
    out = subprocess.run(
        [sys.executable, "-m", "palaestra", "audit-template", "tiny-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "[FAIL] tools in prompt" in out.stdout and "[ok] prefix extension" in out.stdout
    assert "4 of 5 checks pass" in out.stdout
