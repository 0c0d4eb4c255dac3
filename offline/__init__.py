"""Offline tools: workload building and profiling, model preparation, predictor training and
evaluation, and the local launcher. Nothing in the serving path imports this package."""
