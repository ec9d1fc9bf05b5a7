"""Development assets (real model and text from PyPI packages, perplexity): used by tests, benchmarks and the demo; not shipped in the wheel."""
