"""torch.fx front end of the fused engine: models that are not plain ``nn.Sequential`` chains.

:func:`trace` symbolically traces a model (``torch.fx``; modules of ``torch.nn`` are leaves, custom
modules are traced through) into a DAG of fused layers (:class:`Graph`) that the sample-major engine
(:class:`fastcurv.backends.fused.maps._MapEngine`) runs. Supported nodes:

* calls of the leaf modules the chain parser supports (:func:`fastcurv.backends.fused.layers._parse_module`;
  Dropout in eval mode and Identity are skipped). A module called twice shares its parameters:
  both calls add into the same gradient and Hessian-vector product;
* residual additions of two traced tensors of equal shape: ``a + b``, ``a += b``, ``torch.add(a, b)``,
  ``a.add(b)``;
* in-place updates (``a += b``, ``a.add_(b)``, ``F.relu(a, inplace=True)``, ``ReLU(inplace=True)``, ...) of a
  tensor that no operation after them reads, directly or through an alias (Identity, eval Dropout,
  ``Flatten`` and the flattening views return their input or a view of it): torch.fx records the
  update as an out-of-place operation, so a later reader would see the old value in the traced
  graph and the new one in the model. fx records ``a += b`` as ``a + b``; :class:`_Tracer` tells
  them apart by the bytecode that made the call;
* ``F.dropout(x, p, training=self.training)`` in eval mode (training False, or p = 0) and
  ``x.contiguous()``: identities;
* functional activations: ``F.relu``/``torch.relu``/``x.relu()`` (also in place), ``torch.tanh``,
  ``torch.sigmoid``, ``F.gelu`` (exact), ``F.leaky_relu``; functional pooling ``F.max_pool2d``,
  ``F.avg_pool2d``, ``F.adaptive_avg_pool2d`` (as the modules they equal);
* flattening to ``[N, features]``: ``torch.flatten(x, 1)``, ``x.flatten(1)``,
  ``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)`` (the batch size read off any traced
  tensor, e.g. the input), ``x.view(-1, features)``; global average pooling written
  ``x.mean((2, 3))`` or ``torch.mean(x, dim=(-2, -1))`` (AdaptiveAvgPool2d(1) then Flatten);
* one input (the batch) and one output (the logits ``[N, classes]``).

Anything else (``torch.cat``, multiplications, attributes read in ``forward``, unsupported modules,
control flow that fx cannot trace) makes :func:`trace` return ``(None, reason)``, the reason naming
the node and the module or function.
"""
from __future__ import annotations

import dis
import functools
import operator
import os
import sys

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...ops import activation_kind
from .layers import _Layer, _parse_module

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", torch.tanh: "tanh",
                  torch.sigmoid: "sigmoid", F.gelu: "gelu", F.leaky_relu: "leaky_relu"}
# functional pooling: the module it equals, and the functional's parameters after the input in order
_POOL_FUNCTIONS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
                "sigmoid_": "sigmoid"}


_IADD = "fastcurv_inplace_add"  # node.meta key: the sum was written ``a += b``
_SKIP_FRAMES = (os.path.dirname(os.path.abspath(fx.__file__)) + os.sep, os.path.abspath(__file__))


@functools.lru_cache(maxsize=256)
def _inplace_add_offsets(code) -> frozenset:
    """Bytecode offsets of the ``+=`` instructions in ``code``."""
    return frozenset(i.offset for i in dis.get_instructions(code)
                     if i.opname == "INPLACE_ADD" or i.opname == "BINARY_OP" and i.argrepr == "+=")


def _called_by_inplace_add() -> bool:
    """Whether the frame that called into torch.fx (the model's code) is executing ``+=``."""
    try:
        f = sys._getframe(1)
        while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_SKIP_FRAMES):
            f = f.f_back
        return f is not None and f.f_lasti in _inplace_add_offsets(f.f_code)
    except Exception:  # noqa: BLE001 - unknown interpreter details: no mark (check_on still compares)
        return False


class _Tracer(fx.Tracer):
    """torch.fx's tracer, marking the sums written ``a += b`` (``node.meta[_IADD]``): ``fx.Proxy``
    has no ``__iadd__``, so Python runs ``a = a + b`` and fx records an out-of-place sum, while on
    tensors torch updates ``a`` (and every alias of it) in place."""

    def create_node(self, kind, target, *args, **kwargs):
        node = super().create_node(kind, target, *args, **kwargs)
        if kind == "call_function" and target is operator.add and _called_by_inplace_add():
            node.meta[_IADD] = True
        return node


class Graph(list):
    """A traced model for the fused engine: the nodes (:class:`~fastcurv.backends.fused.layers._Layer`, in
    topological order; ``kind == "add"`` for residual additions) and ``inputs[i]``, the nodes
    whose outputs node ``i`` reads (-1: the model input). The last node is the model output."""

    def __init__(self, layers, inputs):
        super().__init__(layers)
        self.inputs = [list(v) for v in inputs]


class _Unsupported(Exception):
    pass


def _describe(node: fx.Node) -> str:
    """The operation of an fx node in words, e.g. "torch.cat (node 'cat' in module 'layer1.0' (Block))"."""
    t = node.target
    if node.op == "call_method":
        what = f"the tensor method .{t}()"
    elif node.op == "call_module":
        what = f"module {t!r}"
    elif node.op == "get_attr":
        what = f"the attribute {t!r} read in forward()"
    elif callable(t):
        mod = getattr(t, "__module__", None) or ""
        mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(mod, mod)
        what = f"{mod}.{getattr(t, '__name__', repr(t))}" if mod else getattr(t, "__name__", repr(t))
    else:
        what = repr(t)
    if node.meta.get(_IADD):
        what += " written '+='"
    where = ""
    stack = node.meta.get("nn_module_stack") or {}
    if stack and node.op != "call_module":
        path, cls = list(stack.values())[-1]
        where = f" in module {path!r} ({getattr(cls, '__name__', cls)})"
    return f"{what} (node {node.name!r}{where})"


def _pool_layer(node: fx.Node, args, kw) -> _Layer:
    """The fused layer of a functional pooling call: the one its module (``nn.MaxPool2d``, ...) with
    the same settings parses to."""
    cls, names = _POOL_FUNCTIONS[node.target]
    opts = dict(zip(names, args[1:]))
    if len(args) - 1 > len(names) or set(kw) - set(names) or any(isinstance(v, fx.Node) for v in (*opts.values(),
                                                                                                   *kw.values())):
        raise _Unsupported(f"{_describe(node)} has arguments {args[1:]} {kw}; not fused")
    opts.update(kw)
    if opts.pop("return_indices", False):
        raise _Unsupported(f"{_describe(node)} returns indices; not fused")
    if opts.get("stride") is None:  # (the functional's default, the module's: the kernel size)
        opts.pop("stride", None)
    layer, why = _parse_module(node.name, cls(**opts))
    if why:
        raise _Unsupported(why)
    return layer


def trace(base: nn.Module) -> tuple[Graph | None, str]:
    """The DAG of ``base`` for the fused engine, or ``(None, reason)``."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(base)
        gm = fx.GraphModule(tracer.root, graph, type(base).__name__)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not fused"
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        return _convert(gm, graph), ""
    except _Unsupported as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a call this front end misreads is not fused either (named)
        return None, f"the fused engine could not read the traced model ({type(e).__name__}: {str(e)[:200]})"


def _convert(gm: fx.GraphModule, graph: fx.Graph) -> Graph:
    ids: dict[fx.Node, int] = {}  # fx node -> fused node (-1: the model input)
    shape_of: dict[fx.Node, fx.Node] = {}  # `x.shape` nodes -> x
    size0_of: dict[fx.Node, fx.Node] = {}  # `x.size(0)` / `x.shape[0]` nodes -> x
    alias_of: dict[fx.Node, fx.Node] = {}  # nodes whose result is their input or a view of it -> that input
    layers: list[_Layer] = []
    inputs: list[list[int]] = []
    out = None
    order = {n: i for i, n in enumerate(graph.nodes)}

    def tensor(a, node) -> int:
        if isinstance(a, fx.Node) and a in ids:
            return ids[a]
        raise _Unsupported(f"{_describe(node)} takes {a!r}, which is not a traced tensor; not fused")

    def add(node, layer, srcs):
        ids[node] = len(layers)
        layers.append(layer)
        inputs.append(srcs)

    def check_inplace(node, src_node):
        # torch updates the tensor `src_node` and every tensor that shares its storage: the tensors it
        # aliases (Identity and eval Dropout return their input, Flatten and the flattening views return
        # a view) and their other aliases. torch.fx records an out-of-place operation, so no operation
        # after `node` may read any of them (it would read the old value in the graph, the new one in
        # the model); shape queries read no values, and operations before `node` read the old value in both
        root = src_node
        while root in alias_of:
            root = alias_of[root]
        stack = [root]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is node or u in size0_of or u in shape_of:
                    continue
                if order[u] > order[node]:
                    what = repr(src_node.name) if root is src_node else f"{root.name!r} (of which {src_node.name!r} is an alias)"
                    raise _Unsupported(f"{_describe(node)} works in place on {what}, which another operation also reads "
                                       f"after it ({_describe(u)}); not fused")
                if alias_of.get(u) is n:  # a view taken before the update: its readers after it see the new value
                    stack.append(u)

    def act_layer(node, kind, slope=0.0):
        return _Layer("act", act=activation_kind(kind), slope=slope, name=node.name)

    for node in graph.nodes:
        op, t = node.op, node.target
        if op != "output" and not node.users:
            # e.g. `h.relu_()` on its own line: fx records a call whose result nobody reads
            raise _Unsupported(f"the result of {_describe(node)} is never used (in-place updates whose result is "
                               "dropped are not fused)")
        if op == "placeholder":
            if -1 in ids.values() or any(n.op == "placeholder" for n in ids):
                raise _Unsupported(f"the model's forward() takes more than one input ({node.name!r}); not fused")
            ids[node] = -1
        elif op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise _Unsupported("the model's forward() returns a tuple, list or dict; the fused engine needs one tensor")
            out = tensor(node.args[0], node)
        elif op == "get_attr":
            raise _Unsupported(f"{_describe(node)} is not supported by the fused engine (only module calls are)")
        elif op == "call_module":
            mod = gm.get_submodule(t)
            if len(node.args) != 1 or node.kwargs:
                raise _Unsupported(f"{_describe(node)} is called with {len(node.args)} arguments/keywords; not fused")
            src = tensor(node.args[0], node)
            layer, why = _parse_module(t, mod)
            if why:
                raise _Unsupported(why)
            if getattr(mod, "inplace", False):
                check_inplace(node, node.args[0])
            if layer is None:  # Identity, Dropout (eval)
                ids[node] = src
                alias_of[node] = node.args[0]
            else:
                add(node, layer, [src])
                # nn.Flatten returns a view of its input (or the input itself), an in-place activation its input
                if layer.kind == "flatten" or getattr(mod, "inplace", False):
                    alias_of[node] = node.args[0]
        elif op in ("call_function", "call_method"):
            args, kw = node.args, dict(node.kwargs)
            is_method = op == "call_method"
            if not is_method and "input" in kw:  # torch.relu(input=h), torch.flatten(input=h, start_dim=1)
                args = (kw.pop("input"), *args)
            if not is_method and t is torch.reshape and "shape" in kw:
                args = (*args, kw.pop("shape"))
            if (t in _ADD_METHODS) if is_method else (t in _ADD_FUNCTIONS):
                if kw.get("alpha", 1) != 1 or set(kw) - {"alpha"} or len(args) != 2:
                    raise _Unsupported(f"{_describe(node)}: only a plain sum of two tensors is fused")
                if not all(isinstance(a, fx.Node) and a in ids for a in args):
                    raise _Unsupported(f"{_describe(node)} adds a constant or a non-tensor value; only sums of two "
                                       "traced tensors (residual additions) are fused")
                inplace = t in (operator.iadd, "add_", "__iadd__") or node.meta.get(_IADD)
                if inplace:
                    check_inplace(node, args[0])
                add(node, _Layer("add", name=node.name), [ids[args[0]], ids[args[1]]])
                if inplace:  # returns its first term
                    alias_of[node] = args[0]
            elif (t in _ACT_METHODS) if is_method else (t in _ACT_FUNCTIONS):
                kind = _ACT_METHODS[t] if is_method else _ACT_FUNCTIONS[t]
                src = tensor(args[0], node)
                slope = 0.0
                if kind == "gelu":
                    if kw.pop("approximate", "none") != "none" or len(args) > 1:
                        raise _Unsupported(f"{_describe(node)} is the tanh-approximated GELU; only the exact GELU is fused")
                if kind == "leaky_relu":
                    slope = float(args[1]) if len(args) > 1 else float(kw.pop("negative_slope", 0.01))
                    args = args[:1] + args[2:]
                inplace = kw.pop("inplace", False) or (len(args) > 1 and args[1] is True) or str(getattr(t, "__name__", t)).endswith("_")
                if kw or len(args) > 1 and not isinstance(args[1], bool):
                    raise _Unsupported(f"{_describe(node)} has arguments {args[1:]} {kw}; not fused")
                if inplace:
                    check_inplace(node, args[0])
                add(node, act_layer(node, kind, slope), [src])
                if inplace:  # returns its input
                    alias_of[node] = args[0]
            elif (t == "flatten") if is_method else (t is torch.flatten):
                start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
                end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
                if start != 1 or end != -1:
                    raise _Unsupported(f"{_describe(node)} flattens dims {start}..{end}; only flatten(x, 1) is fused")
                add(node, _Layer("flatten", name=node.name), [tensor(args[0], node)])
                alias_of[node] = args[0]
            elif (t == "mean") if is_method else (t is torch.mean):
                dims = args[1] if len(args) > 1 else kw.pop("dim", None)
                keepdim = args[2] if len(args) > 2 else kw.pop("keepdim", False)
                if kw or keepdim or not isinstance(dims, (tuple, list)) or sorted(d % 4 for d in dims) != [2, 3]:
                    raise _Unsupported(f"{_describe(node)} averages dims {dims} (keepdim={keepdim}, {kw}); only "
                                       "x.mean((2, 3)), global average pooling to [N, C], is fused")
                # = AdaptiveAvgPool2d(1) then Flatten
                layers.append(_Layer("adaptive", name=f"{node.name}.pool", opts=dict(output_size=1)))
                inputs.append([tensor(args[0], node)])
                add(node, _Layer("flatten", name=node.name), [len(layers) - 1])
            elif not is_method and t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
                p = args[1] if len(args) > 1 else kw.get("p", 0.5)
                training = args[2] if len(args) > 2 else kw.get("training", True)
                if training is not False and p != 0:
                    raise _Unsupported(f"{_describe(node)} drops with p={p} (training={training}: F.dropout's default "
                                       "is True, also in eval mode); not fused, as it draws random numbers")
                ids[node] = tensor(args[0], node)  # (an identity: training=False, as self.training reads in eval mode)
                alias_of[node] = args[0]
            elif is_method and t == "contiguous" and len(args) == 1 and not kw:
                ids[node] = tensor(args[0], node)  # (the same values; a copy or the tensor itself)
                alias_of[node] = args[0]
            elif not is_method and t in _POOL_FUNCTIONS:
                add(node, _pool_layer(node, args, kw), [tensor(args[0], node)])
            elif (t in ("view", "reshape")) if is_method else (t is torch.reshape):
                shape = list(args[1:]) if is_method else list(args[1])
                if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                    shape = list(shape[0])
                # [N, -1] with N read off any traced tensor (every supported layer keeps the batch axis), or
                # [-1, features] (the classic x.view(-1, 16 * 5 * 5): a model that runs on its data has
                # features = the per-sample size there, and the engine check compares it with the model)
                batch_first = len(shape) == 2 and shape[1] == -1 and size0_of.get(shape[0]) in ids
                features_last = len(shape) == 2 and shape[0] == -1 and isinstance(shape[1], int) and shape[1] > 0
                if not (batch_first or features_last):
                    raise _Unsupported(f"{_describe(node)} reshapes to {shape}; only x.view(x.size(0), -1) and "
                                       "x.view(-1, features) are fused")
                add(node, _Layer("flatten", name=node.name), [tensor(args[0], node)])
                alias_of[node] = args[0]
            elif is_method and t == "size" and len(args) == 2 and args[1] == 0 and not kw:
                size0_of[node] = args[0]
            elif not is_method and t is getattr and args[1] == "shape":
                shape_of[node] = args[0]
            elif not is_method and t is operator.getitem and args[0] in shape_of and args[1] == 0:
                size0_of[node] = shape_of[args[0]]
            else:
                raise _Unsupported(f"{_describe(node)} is not supported by the fused engine")
        else:
            raise _Unsupported(f"{_describe(node)} is not supported by the fused engine")
    for n in list(size0_of) + list(shape_of):
        if any(not (u.op == "call_method" and u.target in ("view", "reshape") or u.op == "call_function"
                    and u.target in (operator.getitem, torch.reshape)) for u in n.users):
            raise _Unsupported(f"the batch size {_describe(n)} is used by other operations than a flattening view; not fused")
    if out is None or out < 0:
        raise _Unsupported("the model returns its input unchanged")
    if out != len(layers) - 1:
        raise _Unsupported(f"the model's output is not its last traced operation ({layers[out].name!r}); not fused")
    _check_layout(layers, inputs)
    return Graph(layers, inputs)


def _check_layout(layers, inputs):
    """Feature maps (conv, pooling, BatchNorm2d) and flat features ([N, F]: Linear, BatchNorm1d) must
    not mix: each node's inputs are of one kind, Flatten turns maps into flat features."""
    mode = {-1: "input"}
    for i, l in enumerate(layers):
        found = {mode[j] for j in inputs[i]} - {"input"}
        if len(found) > 1:
            raise _Unsupported(f"the addition {l.name!r} adds feature maps to flat features; not fused")
        m = found.pop() if found else "input"
        if l.kind in ("conv", "maxpool", "avgpool", "adaptive") or l.kind == "bn" and l.opts["dims"] == 2:
            if m == "dense":
                raise _Unsupported(f"module {l.name!r} works on feature maps but follows Flatten/Linear; not fused")
            m = "spatial"
        elif l.kind == "flatten":
            m = "dense" if m == "spatial" else m
        elif l.kind in ("linear", "bn"):
            if m == "spatial":
                raise _Unsupported(f"module {l.name!r} follows feature maps without a Flatten in between; not fused")
            m = "dense"
        mode[i] = m
    if not any(l.kind in ("linear", "conv") for l in layers):
        raise _Unsupported("the model has no Linear or Conv2d layer")
