"""How a model is run over calibration text: whole, or one decoder layer at a time over every
batch (layerwise), with the layers in memory or streamed in from disk one at a time."""
