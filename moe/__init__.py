"""moe-forge: split dense causal LMs into domain experts, train, merge and measure them.

`moe.generate(model, tokenizer, prompt, ...)` is `moe.generation.generate` (imported on first
use, so `import moe` stays light).
"""


def __getattr__(name: str):
    if name == "generate":
        from moe.generation import generate

        return generate
    raise AttributeError(f"module 'moe' has no attribute {name!r}")
