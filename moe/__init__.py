"""moe-forge: split dense causal LMs into domain experts, train, merge and measure them.

Layers, bottom to top (each imports only those below it; tests/test_layers.py checks it):
config, model, data, io, train, eval, generate, delta, merge, surgery, experiments, cli.
Generation from Python: `from moe.generate import generate, load_model`.
"""
