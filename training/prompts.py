"""AnglE prompts A, B, C (the runtime owns the strings; training uses the same ones)."""

from angle_rt.prompts import PROMPTS, resolve_prompt, split_prompt

__all__ = ["PROMPTS", "resolve_prompt", "split_prompt"]
