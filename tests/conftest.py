import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before any kernel module is
# imported, so the Triton kernels run on CPU tensors on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and avoids OpenMP waits on shared CI cores."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module, its module-scoped fixtures too (``pytestmark =
    pytest.mark.usefixtures("one_thread_module")``)."""
    yield from _single_thread()


@pytest.fixture
def torch_conv_calls(monkeypatch):
    """From its first use on: a list of ``(function, kernel size)`` for every call of torch's
    ``conv2d``, ``conv2d_input`` and ``conv2d_weight`` (the paths fastcurv's 1x1 matmuls replace)."""
    calls = []

    def start():
        for mod, name in [(torch.nn.functional, "conv2d"), (torch.nn.grad, "conv2d_input"), (torch.nn.grad, "conv2d_weight")]:
            def spy(*a, _f=getattr(mod, name), _name=name, **k):
                w = a[1]  # the weight, or conv2d_weight's weight size
                calls.append((_name, tuple(w.shape if torch.is_tensor(w) else w)[2:]))
                return _f(*a, **k)

            monkeypatch.setattr(mod, name, spy)
        return calls

    return start


@pytest.fixture
def svg_backend():
    """matplotlib's backend set to "svg" (a stand-in for an interactive or notebook one), restored afterwards."""
    import matplotlib

    old = matplotlib.get_backend()
    matplotlib.use("svg")
    yield matplotlib
    matplotlib.use(old)
