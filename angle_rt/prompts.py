"""AnglE prompts (verbatim from angle_emb 0.6.1) and how a prompt is applied to a text."""

from __future__ import annotations

PROMPTS: dict[str, str] = {
    # English LLaMA NLI models
    "A": 'Summarize sentence "{text}" in one word:"',
    # the Chinese LLaMA model
    "B": 'You can only output one word. Summarize "{text}":"',
    # UAE retrieval queries (documents get no prompt)
    "C": "Represent this sentence for searching relevant passages: {text}",
}

PLACEHOLDER = "{text}"


def split_prompt(template: str) -> tuple[str, str]:
    """Split a prompt into the text before and after the sentence.

    A template with ``{text}`` wraps the sentence; one without is a prefix, as in
    sentence-transformers (``"query: "``).

    >>> split_prompt('Summarize "{text}":')
    ('Summarize "', '":')
    >>> split_prompt("query: ")
    ('query: ', '')
    """
    if PLACEHOLDER not in template:
        return template, ""
    head, _, tail = template.partition(PLACEHOLDER)
    if PLACEHOLDER in tail:
        raise ValueError(f"prompt has more than one {PLACEHOLDER}: {template!r}")
    return head, tail


def resolve_prompt(prompt: str | None, named: dict[str, str]) -> str | None:
    """A prompt name (from `named` or A/B/C) or a literal template; '' or None means none."""
    if not prompt:
        return None
    if prompt in named:
        return named[prompt]
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    return prompt
