"""Offline: ``vizloc-replay`` runs the live pipeline on a recorded bag and writes a report.

``cli`` reads the images and runs the network, ``fusion_side`` fuses in a second process
and writes the result bag, ``report`` writes the metrics, plots and TUM files.
"""
