"""The torch settings fastcurv computes under, whatever the caller's: :func:`ambient_reset`.

fastcurv differentiates on its own (Hessian and gradient products, training), runs its own linear
algebra (Lanczos in float64, batched products of the models' dtype) and flags a replica whose
numbers turn NaN while the others go on. Four torch settings of the caller would reach into that:

* grad mode off (``torch.no_grad()``, ``torch.set_grad_enabled(False)``, ``torch.inference_mode()``,
  an eval loop's or a ``@torch.no_grad()`` callback's): the backends that build autograd graphs
  had nothing to differentiate (torch's "element 0 of tensors does not require grad"), and training
  read every parameter as unused by the forward pass and returned the models untrained;
* inference mode: tensors made inside cannot be saved for backward;
* autocast (``torch.autocast(...)``, a mixed-precision loop's region): the models and fastcurv's
  own products ran in bfloat16/float16 (results up to 2x off, flagged nowhere), and its float64
  tridiagonal products were refused with a dtype error;
* anomaly detection (``torch.autograd.set_detect_anomaly(True)``): the NaN that one non-finite
  replica's backward pass produces, which fastcurv flags for that replica alone, became an error
  of the whole call.

Inside :func:`ambient_reset` grad mode is on, inference mode is off, autocast is off on every
device type and anomaly detection is off; leaving it brings the caller's settings back. So
fastcurv computes in the models' own dtype whatever autocast region it is called from, and the
entry points (``batched_sharpness``, ``function_measures``, ``invariance_audit``, the solvers,
``train_population``, ``evaluate_population``, ``study``, the operators' products) give inside
``torch.no_grad()``, ``torch.inference_mode()``, ``torch.autocast`` or anomaly detection what they
give outside.

Grad mode, inference mode and autocast are settings of the calling thread (threads fastcurv starts
begin with torch's defaults, which are these); anomaly detection is the process's: while any
fastcurv call runs, it is off in every thread, and the last call to leave turns it back on.
"""
from __future__ import annotations

import functools
import threading
from contextlib import ExitStack, contextmanager

import torch

# the device types torch.autocast takes (is_autocast_enabled raises for others, and for some of these on older torch)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "privateuseone")
_lock = threading.Lock()
_depth = 0  # ambient_reset blocks open, in every thread (anomaly detection is process-wide)
_anomaly = (False, True)  # (enabled, check_nan) as the outermost block found them


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
def _anomaly_off():
    """Anomaly detection off while any such block is open (in any thread: it is one process-wide
    setting), the setting the outermost block found restored when the last one closes."""
    global _depth, _anomaly
    with _lock:
        _depth += 1
        if _depth == 1:
            _anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
            if _anomaly[0]:
                torch.set_anomaly_enabled(False)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _anomaly[0]:
                torch.set_anomaly_enabled(*_anomaly)


@contextmanager
def ambient_reset():
    """Within this block grad mode is on, inference mode off, autocast off (every device type) and
    anomaly detection off; the caller's settings come back on leaving (see the module docstring).
    Nests."""
    with ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device in _autocast_on():
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        stack.enter_context(_anomaly_off())
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
