"""The layers the fused engine supports: a model parsed into a chain of :class:`_Layer` (or traced
into a DAG by :mod:`.graph`), and which of the two engines runs it."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...ops import activation_kind

_ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass
class _Layer:
    kind: str  # "linear" | "act" | "flatten" | "conv" | "bn" | "maxpool" | "avgpool" | "adaptive" | "add" (graphs)
    weight: str | None = None
    bias: str | None = None
    act: int = 0
    slope: float = 0.0
    name: str = ""
    opts: dict = field(default_factory=dict)  # conv/pool hyper-parameters; bn: buffer names and eps

    @property
    def batch_stats(self) -> bool:
        """A BatchNorm normalizing each batch by its own statistics (its R-op couples the samples)."""
        return self.kind == "bn" and bool(self.opts.get("batch"))


def _leaves(module: nn.Module, prefix: str = ""):
    """``(name, module)`` of a nested ``nn.Sequential``'s modules in the order it runs them, each
    as often as it runs (``named_children`` would list a reused module once)."""
    if isinstance(module, nn.Sequential):
        for name, child in module._modules.items():
            if child is not None:
                yield from _leaves(child, f"{prefix}{name}.")
    else:
        yield prefix[:-1], module


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


_SPATIAL = ("conv", "maxpool", "avgpool", "adaptive")


def _parse_module(name: str, mod: nn.Module) -> tuple[_Layer | None, str]:
    """One leaf module as a fused layer; (None, "") for an identity, (None, reason) if unsupported."""
    if getattr(mod, "parametrizations", None):  # (its weight is computed from other parameters)
        return None, (f"module {name!r} is parametrized ({', '.join(mod.parametrizations)} computed from other "
                      "parameters, e.g. by weight_norm, spectral_norm or orthogonal); not fused")
    if isinstance(mod, nn.Linear):
        return _Layer("linear", f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, name=name), ""
    if type(mod) in _ACTS:
        kind = _ACTS[type(mod)]
        if kind == "gelu" and mod.approximate != "none":
            return None, f"module {name!r} is GELU(approximate={mod.approximate!r}); only the exact GELU is fused"
        slope = float(mod.negative_slope) if kind == "leaky_relu" else 0.0
        return _Layer("act", act=activation_kind(kind), slope=slope, name=name), ""
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            return None, f"module {name!r} is Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}); only Flatten() is fused"
        return _Layer("flatten", name=name), ""
    if isinstance(mod, (nn.Dropout, nn.Identity)):
        if isinstance(mod, nn.Dropout) and mod.training:
            return None, f"module {name!r} is Dropout in training mode"
        return None, ""
    if type(mod) is nn.Conv2d:
        if mod.padding_mode != "zeros":
            return None, f"module {name!r} is Conv2d(padding_mode={mod.padding_mode!r}); only zero padding is fused"
        k, d = _pair(mod.kernel_size), _pair(mod.dilation)
        pad = mod.padding
        if pad == "valid":
            pad = (0, 0)
        elif pad == "same":
            if any(di * (ki - 1) % 2 for ki, di in zip(k, d)):
                return None, f"module {name!r} is Conv2d(padding='same') with asymmetric padding; not fused"
            pad = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
        opts = dict(stride=_pair(mod.stride), padding=_pair(pad), dilation=d, groups=int(mod.groups))
        return _Layer("conv", f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, name=name, opts=opts), ""
    if type(mod) is nn.MaxPool2d:
        if mod.return_indices:
            return None, f"module {name!r} is MaxPool2d(return_indices=True); not fused"
        opts = dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                    padding=_pair(mod.padding), dilation=_pair(mod.dilation), ceil_mode=bool(mod.ceil_mode))
        return _Layer("maxpool", name=name, opts=opts), ""
    if type(mod) is nn.AvgPool2d:
        opts = dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                    padding=_pair(mod.padding), ceil_mode=bool(mod.ceil_mode), count_include_pad=bool(mod.count_include_pad),
                    divisor_override=mod.divisor_override)
        return _Layer("avgpool", name=name, opts=opts), ""
    if type(mod) is nn.AdaptiveAvgPool2d:
        return _Layer("adaptive", name=name, opts=dict(output_size=mod.output_size)), ""
    if type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if mod.training or mod.running_mean is None:
            # batch statistics (bn_mode='batch' or track_running_stats=False): each batch is normalized
            # with its own biased mean and variance per channel (running statistics neither used nor updated)
            opts = dict(batch=True, eps=float(mod.eps), dims=1 if isinstance(mod, nn.BatchNorm1d) else 2)
            return _Layer("bn", f"{name}.weight" if mod.affine else None, f"{name}.bias" if mod.affine else None,
                          name=name, opts=opts), ""
        opts = dict(mean=f"{name}.running_mean", var=f"{name}.running_var", eps=float(mod.eps),
                    dims=1 if isinstance(mod, nn.BatchNorm1d) else 2)
        return _Layer("bn", f"{name}.weight" if mod.affine else None, f"{name}.bias" if mod.affine else None, name=name, opts=opts), ""
    return None, f"module {name!r} ({type(mod).__name__}) is not supported by the fused engine"


def parse(base: nn.Module) -> tuple[list[_Layer] | None, str]:
    """The layers of ``base`` for the fused engine, or (None, reason): an ``nn.Sequential`` (nested
    allowed) of ``torch.nn`` modules as a chain (a list); any other model (custom ``forward``,
    residual blocks) traced by torch.fx into a DAG (:class:`.graph.Graph`)."""
    leaves = list(_leaves(base))
    custom = any(not type(m).__module__.startswith("torch.") for _, m in leaves) or any(
        isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward for m in base.modules())
    held = [id(p) for _, m in leaves for p in m.parameters()]
    if not isinstance(base, nn.Sequential) or custom or len(set(held)) < len(held):
        # (a parameter used twice, by a module run twice or by tied modules: the graph engine sums
        # both uses' products, under the name the replicas stack it by)
        from ...replicas import tied_parameters
        from .graph import trace

        layers, why = trace(base)
        ties = tied_parameters(base)
        for l in layers or ():
            l.weight, l.bias = ties.get(l.weight, l.weight), ties.get(l.bias, l.bias)
        return layers, why
    layers: list[_Layer] = []
    for name, mod in leaves:
        layer, why = _parse_module(name, mod)
        if why:
            return None, why
        if layer is not None:
            layers.append(layer)
    if not any(l.kind in ("linear", "conv") for l in layers):
        return None, "the model has no Linear or Conv2d layer"
    # feature maps (conv, pooling, BatchNorm2d) come first, then Flatten, then the dense head
    mode = "input"
    for l in layers:
        if l.kind in _SPATIAL or l.kind == "bn" and l.opts["dims"] == 2:
            if mode == "dense":
                return None, f"module {l.name!r} works on feature maps but follows Flatten/Linear; not fused"
            mode = "spatial"
        elif l.kind == "flatten":
            if mode == "spatial":
                mode = "dense"
        elif l.kind == "linear" or l.kind == "bn":
            if mode == "spatial":
                return None, f"module {l.name!r} follows feature maps without a Flatten in between; not fused"
            mode = "dense"
    if not _is_general(layers):
        first = next(i for i, l in enumerate(layers) if l.kind == "linear")
        if any(l.kind == "flatten" for l in layers[first:]):
            return None, "Flatten after the first Linear layer is not supported by the fused engine"
    return layers, ""



def _is_general(layers) -> bool:
    """True when the model needs the sample-major engine: a traced graph, or a chain with anything
    beyond Linear/activations/Flatten."""
    return hasattr(layers, "inputs") or any(l.kind not in ("linear", "act", "flatten") for l in layers)

