"""Generation from any checkpoint: sampling with a KV cache (generation), views of the routing
record (routing_view) and the `moe generate` command (command).

    from moe.generate import generate, load_model
    model, tokenizer, _ = load_model("runs/quickstart/stages/moe")
    g = generate(model, tokenizer, "def main(", max_new_tokens=64)
"""

from moe.generate.command import load_model
from moe.generate.generation import generate

__all__ = ["generate", "load_model"]
