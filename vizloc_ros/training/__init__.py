"""Offline: training (``vizloc-train``), evaluation (``vizloc-eval``) and export
(``vizloc-export``). Uses the runtime stages; nothing in the runtime imports this package.
"""
