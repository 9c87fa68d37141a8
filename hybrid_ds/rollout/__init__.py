"""Rollout: sampling responses from the policy (the lean KV-cache sampler)."""
