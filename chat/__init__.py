"""Steering: chat sources, commands, moderation, votes and the prompt queue."""
