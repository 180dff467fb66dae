"""The lab: the tools that measure and choose (benchmarks, design-space studies, tokenizer training).

Run them from the repository root as modules, e.g. ``python -m lab.bench``; nothing in the core imports them.
"""
