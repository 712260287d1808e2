"""repskip's built-in benchmarks: GSM8K, MATH-500, HumanEval and MBPP (generation), ARC-Easy
and ARC-Challenge (log-likelihood multiple choice) and perplexity (entry points in
``repskip.benchmarks``). See each module's docstring for its prompt, options and scoring."""

__version__ = "0.1.0"
