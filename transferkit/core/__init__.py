"""Plumbing every layer shares: atomic file writes, device/AMP/seeding, torchrun collectives."""
