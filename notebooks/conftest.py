"""The notebooks' kernels run torch on one thread (unless ``OMP_NUM_THREADS`` says otherwise):
the zoo models are tiny, so a second thread gains nothing, and threads contending with other work
on a small machine made a notebook several times slower."""

import os

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if item.path.suffix != ".ipynb" or "OMP_NUM_THREADS" in os.environ:
        return (yield)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return (yield)
    finally:
        del os.environ["OMP_NUM_THREADS"]
