"""Writing the compressed model: safetensors checkpoints at file level, ONNX graphs."""
