"""fastcurv: curvature, sharpness and function-space measures for many replicas at once."""
import torch  # noqa: F401  (load torch before the compiled extension)

from . import ops
from ._heap import heap_reuse
from ._ext import cpu_extension_loaded, cuda_extension_loaded, kernel_impl, set_kernel_impl, use_kernels
from .operator import HessianOperator, hvp
from .ops.agreement_counts import AgreementCounts, agreement_counts
from .function import FunctionMeasuresResult, function_measures
from .replicas import ReplicaSet
from .sharpness import SharpnessResult, batched_sharpness
from .solvers import hutchinson, hutchpp, lanczos, power_iteration, slq
from . import reparam
from . import distributed, resume  # replica sharding (torch.distributed) and resumable chunked jobs
from .audit import AuditResult, invariance_audit
from .curvature import EmpiricalFisherOperator, GGNOperator
from .study import study  # noqa: E402  (the function; the module stays importable as fastcurv.study via sys.modules)

__version__ = "0.1.0"

cpu_extension_loaded()

__all__ = [
    "AuditResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "invariance_audit",
    "reparam",
    "AgreementCounts",
    "agreement_counts",
    "FunctionMeasuresResult",
    "function_measures",
    "HessianOperator",
    "ReplicaSet",
    "SharpnessResult",
    "batched_sharpness",
    "cpu_extension_loaded",
    "cuda_extension_loaded",
    "heap_reuse",
    "hutchinson",
    "hutchpp",
    "hvp",
    "kernel_impl",
    "lanczos",
    "ops",
    "power_iteration",
    "set_kernel_impl",
    "slq",
    "study",
    "use_kernels",
]
