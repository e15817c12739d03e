"""Offline: the synthetic world (``vizloc-synth``): scenes, rendering, trajectories and
simulated sensors. Uses the runtime stages; nothing in the runtime imports this package.
"""
