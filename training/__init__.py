"""Keel training: reward models from human feedback, RLHF for policies, and their evaluation."""
