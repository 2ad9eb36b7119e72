"""Benchmarks print their tables; results and cached inputs go to benchmarks/results (git-ignored)."""
import os

import pytest
import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


@pytest.fixture(scope="session")
def results_dir():
    os.makedirs(RESULTS, exist_ok=True)
    return RESULTS


torch.set_num_threads(max(1, os.cpu_count() or 1))
