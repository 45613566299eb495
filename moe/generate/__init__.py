"""Generation from any checkpoint: sampling with a KV cache (generation), views of the routing
record (routing_view) and the `moe generate` command (command).

    from moe.generate import generate, load_model
    model, meta, tokenizer, path = load_model("runs/quickstart/stages/moe")
    g = generate(model.eval(), tokenizer, "def main(", max_new_tokens=64)
"""

from moe.generate.generation import generate
from moe.io.checkpoint import load_model

__all__ = ["generate", "load_model"]
