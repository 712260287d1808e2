"""repskip's built-in plugin for transformers-native decoders with a ``model.layers`` stack."""
