"""Keel service: reward scoring and moderation over HTTP."""
