"""Example repskip plugin (docs/plugins.md): GPT-2 checkpoints, a plain greedy sampler and
an ARC-Easy benchmark."""
