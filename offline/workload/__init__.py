"""Workload: applications, requests and arrival processes built from third-party corpora."""
