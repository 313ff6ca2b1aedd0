"""pytest plugin (``-p accel.gpucheck.pytest_gpu_tests``): mark every GPU test ``cuda``, so ``-m cuda`` runs them all.

Some GPU tests carry the ``cuda`` marker; others are only skipped "without a GPU" (a ``skipif`` whose reason
names CUDA or a GPU). This adds the marker to those before ``-m`` selects, so no GPU test is left out.
"""
from __future__ import annotations

import re

import pytest

_GPU_REASON = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)


def needs_gpu(item) -> bool:
    if item.get_closest_marker("cuda") is not None:
        return True
    return any(_GPU_REASON.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


@pytest.hookimpl(tryfirst=True)  # before the -m selection
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") is None and needs_gpu(item):
            item.add_marker(pytest.mark.cuda)
