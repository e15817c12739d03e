"""One context for the tests that train: the same arithmetic on every machine and load.

Why: a test that runs a few optimiser steps and asserts the loss fell follows one
trajectory of floating-point operations. Its result must not depend on how many intra-op
threads torch happens to use (a reduction over 1 or 15 threads rounds differently; the
module fixture ``fast_cpu`` sets 1, but any ``PoseEstimator`` built in between sets its
own), on an algorithm torch may pick non-deterministically, or on what the global random
generator was used for before. Inside the context: one thread, deterministic algorithms,
a fixed seed; everything is restored afterwards.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def deterministic_torch(seed: int = 0):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
