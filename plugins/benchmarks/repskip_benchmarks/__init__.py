"""repskip's built-in benchmarks: GSM8K, MATH-500, HumanEval and MBPP (entry points in
``repskip.benchmarks``). See each module's docstring for its prompt, options and scoring."""

__version__ = "0.1.0"
