"""Parameters that change size during training (a Gaussian model densifies and prunes), with the
optimizer state following them, as gsplat's strategy operations do.

``replace_parameter`` swaps a module's parameter for a new ``nn.Parameter`` and, in every optimizer
holding the old one, puts the new one in its place and moves its state to it: each state tensor
shaped like the parameter (Adam's ``exp_avg``/``exp_avg_sq``, SGD's momentum) and the gradient are
mapped by ``carry``; scalars (Adam's ``step``) are kept. ``keep_rows`` and ``append_rows`` are the two
usual cases (prune/reorder: rows of the state kept; grow: zero-filled state rows).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Carry = Callable[[torch.Tensor], torch.Tensor]


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return module.get_submodule(owner_name), leaf


def _parameter(module: nn.Module, name: str) -> nn.Parameter:
    owner, leaf = _owner(module, name)
    param = owner._parameters.get(leaf)
    if param is None:
        raise KeyError(f"{name} is not a parameter of {module.__class__.__name__}")
    return param


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor,
                      optimizers: Iterable[torch.optim.Optimizer], carry: Carry) -> nn.Parameter:
    """Make ``value`` the parameter ``name`` (dotted) of ``module``; ``carry`` maps a tensor shaped
    like the old parameter (its gradient, its optimizer state) to one shaped like ``value``."""
    old = _parameter(module, name)
    new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = carry(old.grad)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index] = new
                    state = optimizer.state.pop(old, None)
                    if state is not None:
                        optimizer.state[new] = {
                            key: carry(v) if torch.is_tensor(v) and v.dim() > 0 and v.shape == old.shape else v
                            for key, v in state.items()}
    owner, leaf = _owner(module, name)
    owner._parameters[leaf] = new
    return new


def keep_rows(module: nn.Module, name: str, rows: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer]
              ) -> nn.Parameter:
    """Keep the rows ``rows`` (indices or a bool mask along dim 0) of a parameter and of its state."""
    param = _parameter(module, name)
    return replace_parameter(module, name, param.detach()[rows], optimizers, lambda t: t[rows])


def append_rows(module: nn.Module, name: str, rows: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer]
                ) -> nn.Parameter:
    """Append ``rows`` [k,...] to a parameter [N,...]; their gradient and optimizer state start at zero."""
    param = _parameter(module, name)
    value = torch.cat([param.detach(), rows.to(param.device, param.dtype)])

    def grow(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros((len(rows), *tensor.shape[1:]))])

    return replace_parameter(module, name, value, optimizers, grow)


def set_state_tensor(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` at state-dict key ``key`` of ``module`` as a parameter (same requires_grad) or buffer;
    used where only the module, not an optimizer, holds the tensor (EMA copies)."""
    owner, leaf = _owner(module, key)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old is not None and old.requires_grad)
    else:
        owner._buffers[leaf] = value


def match_state_shapes(module: nn.Module, state: dict[str, torch.Tensor],
                       optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Resize the parameters and buffers of ``module`` whose shape differs from ``state`` (a checkpoint
    of a model that grew or shrank), so that ``load_state_dict(state)`` fits; the optimizers that
    hold a resized parameter get the new one (their state is loaded afterwards)."""
    optimizers = list(optimizers)
    current = module.state_dict(keep_vars=True)
    for key, saved in state.items():
        tensor = current.get(key)
        if tensor is None or tensor.shape == saved.shape:
            continue
        empty = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
        owner, leaf = _owner(module, key)
        if leaf in owner._parameters:
            replace_parameter(module, key, empty, optimizers, lambda t, shape=saved.shape: t.new_zeros(shape))
        else:
            owner._buffers[leaf] = empty
