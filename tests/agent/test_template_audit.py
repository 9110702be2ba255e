"""Template audit: SmolLM2's verdicts, templates that rewrite history or ignore tools, and
the audit a training run calls."""

from __future__ import annotations

import subprocess
import sys

import pytest

from palaestra.agent.errors import ChatTemplateError
from palaestra.agent.template_audit import audit_for_training, audit_template

STRIPPING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(tokenizer, template: str | None):
    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other.chat_template = template
    return other


def verdicts(checks) -> dict[str, bool]:
    return {check.name: check.passed for check in checks}


def test_smollm2_template_extends_turns_but_ignores_tools(tokenizer):
    assert verdicts(audit_template(tokenizer)) == {
        "generation prompt": True,
        "end of turn": True,
        "prefix extension": True,
        "history kept": True,
        "tools in prompt": False,  # SmolLM2's ChatML template has no tools block
        "tool-call round trip": True,
    }


def test_a_template_that_strips_reasoning_fails_prefix_and_history(tokenizer):
    result = verdicts(audit_template(with_template(tokenizer, STRIPPING)))
    assert result["prefix extension"] is False and result["history kept"] is False
    assert result["generation prompt"] is True
    assert result["tool-call round trip"] is True  # the call itself survives the stripping


def test_training_audit_checks_what_the_run_needs_and_says_what_it_will_do(tokenizer):
    stripping = with_template(tokenizer, STRIPPING)
    single = audit_for_training(stripping, multi_turn=False, tools=False)
    multi = audit_for_training(stripping, multi_turn=True, tools=True)

    assert [c.name for c in single] == ["generation prompt", "end of turn"]
    assert list(verdicts(multi)) == [
        "generation prompt",
        "end of turn",
        "prefix extension",
        "history kept",
        "tools in prompt",
        "tool-call round trip",
    ]
    failed = [c for c in multi if not c.passed]
    assert [c.name for c in failed] == ["prefix extension", "history kept", "tools in prompt"]
    assert any("splits such episodes" in c.detail for c in failed)
    assert any("describes the tools" in c.detail for c in failed)


def test_a_template_that_cannot_prompt_the_model_stops_training(tokenizer):
    no_header = STRIPPING.replace("<|im_start|>assistant\n", "")
    with pytest.raises(ChatTemplateError, match="cannot prompt the model"):
        audit_for_training(with_template(tokenizer, no_header), multi_turn=False, tools=False)
    with pytest.raises(ChatTemplateError, match="rendering failed"):
        audit_for_training(with_template(tokenizer, None), multi_turn=True, tools=True)


def test_audit_template_command_prints_a_verdict_per_check():
    out = subprocess.run(
        [sys.executable, "-m", "palaestra", "audit-template", "tiny-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "[FAIL] tools in prompt" in out.stdout and "[ok] prefix extension" in out.stdout
    assert "5 of 6 checks pass" in out.stdout
