"""Evaluation: the public suites, policy evaluation, metrics, the cache and the HTML report."""
