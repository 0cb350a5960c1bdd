"""Evaluation of edits: CounterFact and zsRE cases, the paper's metrics, the FT-L baseline, and the runner.

Imports the engine (``editing``); the engine never imports this package.
"""
