"""The shared model of dstackd: domain types, events, the log and its projection.

This package imports nothing from ``dstackd`` or ``dstackctl``.
"""
