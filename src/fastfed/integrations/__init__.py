"""Integrations that put fastfed's aggregation and compression inside other FL frameworks."""
