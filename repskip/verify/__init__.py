"""What a compressed model keeps: benchmarks run on base and compressed, likelihoods,
statistics, the sandbox for generated code, the lm-eval adapter."""
