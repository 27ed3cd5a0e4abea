"""Reward models: heads trained on preference pairs (Bradley-Terry) and ratings (regression)."""
