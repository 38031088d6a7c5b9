"""Evaluation: the competition metric and its relatives."""
