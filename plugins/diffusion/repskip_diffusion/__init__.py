"""repskip's built-in plugin for masked-diffusion language models (LLaDA, Dream).

Both run on one implementation of a bidirectional Llama-style decoder (model.py); the two
families differ only in their config keys, tensor names and logit alignment.
"""
