"""Evaluators. They run one model at a time and never hold two models in memory."""
