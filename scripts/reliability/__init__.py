"""Reliability runs against a real gateway and workers (see README, "Reliability")."""
