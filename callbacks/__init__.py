"""Callbacks: diagnostics, token filtering and export hooks shared by the methods."""
