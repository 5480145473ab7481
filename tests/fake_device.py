"""A tensor subclass that says it is on "cuda" but holds CPU values, for device-handling tests on a
machine with no GPU."""
import torch
import torch.utils._pytree as pytree


class OnOtherDevice(torch.Tensor):
    """A tensor that says it is on "cuda" but holds CPU values (as torch's FakeTensor says it is on a
    device it is not): another device with no GPU. Ops on it run on its values and give such tensors;
    like CUDA it refuses ops that mix it with CPU tensors of more than 0 dimensions; only
    ``.to("cpu")`` gives the values back as a CPU tensor."""

    @staticmethod
    def __new__(cls, values):
        t = torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device="cuda")
        t.values = values
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default:
            device = kwargs.pop("device", None)
            values = func(args[0].values, **kwargs)
            return values if device is not None and torch.device(device).type == "cpu" else cls(values)
        if any(isinstance(t, torch.Tensor) and not isinstance(t, cls) and t.dim() > 0
               for t in pytree.tree_leaves((args, kwargs))):
            raise RuntimeError(f"Expected all tensors to be on the same device ({func}: cuda and cpu)")
        args, kwargs = pytree.tree_map_only(cls, lambda t: t.values, (args, kwargs))
        return pytree.tree_map_only(torch.Tensor, cls, func(*args, **kwargs))
