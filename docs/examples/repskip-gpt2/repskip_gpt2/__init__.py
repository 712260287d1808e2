"""Example repskip plugin (docs/plugins.md): GPT-2 checkpoints and a plain greedy sampler."""
