"""The study report's samples: one fixed prompt per domain, continued greedily by the seed, each
branch and the experts' MoE, with the MoE's routing per token (moe.generate.generation)."""

from __future__ import annotations

from moe.io.checkpoint import load_model

# fixed prompts, one per built-in domain (a new domain gets no sample)
PROMPTS = {
    "text": "It is a truth universally acknowledged, that a single man in possession",
    "code": "def read_config(path):\n    with open(path) as f:\n",
    "dna": "ATGAAAAAGCTTATTGCAGCAGTTGCGGCAATTGCT",
}


def study_samples(ctx, stage_labels: list[tuple[str, str]], domains: list[str],
                  max_new_tokens: int = 48) -> str | None:
    """Markdown from `samples_markdown` (moe/generate/) for the given (stage, label) models."""
    from moe.generate.generation import samples_markdown

    prompts = {d: PROMPTS[d] for d in domains if d in PROMPTS}
    entries = []
    for stage, label in stage_labels:
        if not ctx.done(stage):
            continue
        entries.append((label, load_model(ctx.model_dir(stage)).model.eval()))
    if not prompts or not entries:
        return None
    return samples_markdown(entries, prompts, max_new_tokens=max_new_tokens, level=2)
