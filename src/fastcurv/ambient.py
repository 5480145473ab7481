"""The torch settings fastcurv computes under, whatever the caller's: :func:`ambient_reset`.

fastcurv differentiates on its own (Hessian and gradient products, training) and runs its own linear
algebra (Lanczos in float64, batched products of the models' dtype). Three torch settings of the
calling thread would reach into that:

* grad mode off (``torch.no_grad()``, ``torch.set_grad_enabled(False)``, ``torch.inference_mode()``,
  an eval loop's or a ``@torch.no_grad()`` callback's): the backends that build autograd graphs
  had nothing to differentiate (torch's "element 0 of tensors does not require grad"), and training
  read every parameter as unused by the forward pass and returned the models untrained;
* inference mode: tensors made inside cannot be saved for backward;
* autocast (``torch.autocast(...)``, a mixed-precision loop's region): the models and fastcurv's
  own products ran in bfloat16/float16 (results up to 2x off, flagged nowhere), and its float64
  tridiagonal products were refused with a dtype error.

Inside :func:`ambient_reset` grad mode is on, inference mode is off and autocast is off on every
device type; leaving it brings the caller's settings back. So fastcurv computes in the models' own
dtype whatever autocast region it is called from, and the entry points (``batched_sharpness``,
``function_measures``, ``invariance_audit``, the solvers, ``train_population``,
``evaluate_population``, ``study``, the operators' products) give inside ``torch.no_grad()``,
``torch.inference_mode()`` or ``torch.autocast`` what they give outside. These are settings of the
calling thread (threads fastcurv starts begin with torch's defaults, which are these).

Anomaly detection (``torch.autograd.set_detect_anomaly``) is left as the caller set it: it is one
setting of the whole process, which a call in one thread cannot turn off without turning it off
for every other thread too. Under it, the NaN that a non-finite replica's backward pass produces
raises, as anomaly detection is meant to, instead of being flagged for that replica alone.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager

import torch

# the device types torch.autocast takes (is_autocast_enabled raises for others, and for some of these on older torch)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "privateuseone")


def _autocast_on() -> list[str]:
    """The device types whose autocast is on in this thread."""
    on = []
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                on.append(device)
        except (RuntimeError, TypeError):  # (a device type this torch's autocast does not know)
            pass
    return on


@contextmanager
def ambient_reset():
    """Within this block grad mode is on, inference mode off and autocast off (every device type);
    the caller's settings come back on leaving (see the module docstring). Nests."""
    with ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device in _autocast_on():
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def resetting_ambient(fn):
    """Decorator: run ``fn`` inside :func:`ambient_reset` (a function, or a method: ``@resetting_ambient``
    above its ``def``). A warning ``fn`` raises itself needs one more ``stacklevel`` to name its caller."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ambient_reset():
            return fn(*args, **kwargs)

    return wrapper


def outside_inference(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is an inference tensor (made under ``torch.inference_mode``,
    e.g. data preprocessed there), which autograd cannot save for backward and which has no version
    counter. Call it inside :func:`ambient_reset`: a copy made in inference mode is one again."""
    return t.clone() if t.is_inference() else t
