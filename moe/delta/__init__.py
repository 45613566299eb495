"""Fine-tune deltas: extract/apply, compression methods (one file each, registered by name),
merging from deltas, and the simulated fleet of replicas exchanging compressed deltas.

from moe.delta.ops import extract, compress, apply_delta, info
"""
