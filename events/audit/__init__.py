"""Audit of an event log: verify, replay, export, cost and placement explanations.

Every function here reads through a ``events.log_reader.LogReader`` and never
writes, so the daemon (on a read-only connection to its own log) and
``dstackctl --log FILE`` (on a copied file) run the same code and return the same
results. Records are streamed in chunks; memory grows with the number of pools,
instances and runs, not with the number of records.

Modules: ``times`` (time options), ``records`` (event lines, filters, checked
reads), ``verify``, ``export``, ``replay``, ``cost``, ``idle_policy`` (the
what-if of another idle duration), ``explain`` and ``offline`` (the entry
points of ``dstackctl --log``).
"""
