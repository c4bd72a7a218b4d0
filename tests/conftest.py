"""The fixtures every test folder may use (fixtures only: helpers are in :mod:`tests.helpers`).

One fixture per purpose; a fixture that only one folder uses lives in that folder's ``conftest.py``
(``tests/mishax_py/studies/conftest.py``), one that only one module uses in that module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import Gemma2ForCausalLM

import instrumentation.gemma2 as g2
from mishax_py import InstrumentedModel
from tests.helpers import BUNDLED, make_model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module on one intra-op thread (restored afterwards).

    Modules of tiny tensors use it (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core CPU, two threads are several times slower for them.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> Gemma2ForCausalLM:
    """A fresh random 2-layer Gemma 2 (:func:`tests.helpers.make_model`)."""
    return make_model()


@pytest.fixture
def tiny_im(tiny_model: Gemma2ForCausalLM) -> InstrumentedModel:
    return g2.instrument(tiny_model)


@pytest.fixture
def ids() -> torch.Tensor:
    """Two rows of 10 token ids in 4..63."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 64, (2, 10), generator=g)


@pytest.fixture(scope="module")
def zoo_im() -> InstrumentedModel:
    """The bundled trained ``gemma2-tiny``, instrumented (the test is skipped where its weights are missing)."""
    if not BUNDLED:
        pytest.skip("bundled gemma2-tiny weights are not in this build")
    from mishax_py.zoo import load

    return g2.instrument(load("gemma2-tiny")[0])
