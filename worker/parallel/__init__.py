"""Tensor parallelism: one model split across the ranks of a group (worker/parallel/plan.py
says which rank holds what; DESIGN.md's "Scaling out" the leader and followers)."""
