"""Batched sandbox tool executor for reinforcement learning on LLM agents."""

__version__ = "0.1.0"
