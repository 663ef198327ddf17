"""Generators, one-call generate(), model registry and checkpoint loaders."""
