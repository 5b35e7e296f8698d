"""Tamiyo's policy engine: featurizer, GCN policy, batched inference, rules, checkpoints.

Shared by the server, the trainer and the simulator (see INTERFACES.md). Modules:
``features`` (schema + featurize; snapshots live in ``snapshot``), ``topology`` (cached
normalised adjacency), ``model`` (network + per-graph log-softmax), ``batch`` (collate),
``engine`` (batched inference), ``rules`` (decision rules + fallback + exploration),
``checkpoint`` (safetensors + manifest), ``builtin`` (which policy to serve).
"""
