"""Moderation models: one sigmoid output per OpenAI category, trained on partially labelled harm data."""
