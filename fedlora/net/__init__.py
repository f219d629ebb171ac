"""Deployment plumbing: TLS material, process lifetime."""
