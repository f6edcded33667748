"""The per-model time-projection table: every ResidualBlock's time projection for every step, precomputed.

While sampling, t is shared by the whole batch and takes at most T values, so the time path (sinusoid,
MLP, Swish and each block's time Linear plus its conv1 bias) becomes one row gather per step: no host
sync, the same kernels for every t, and so one CUDA graph serves every step. This is sampler machinery
built on the time_embedding op; the UNet only reads `model.time_table` when one is attached.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops.time_embedding import time_embedding
from ..reference import functional

__all__ = ["TimeTable", "attach_time_table", "detach_time_table", "optimizer_steps", "param_version"]


def _time_path(model) -> Tuple[List[Tuple[dict, str, object]], List[torch.nn.Module], List[Optional[torch.Tensor]]]:
    """The time path: the Linear layers (the time MLP's two, named by the model's TIME_PATH, then each
    ResidualBlock's time Linear, named by its TIME_LINEAR, in res_blocks() order, the order forward consumes
    projections), each block's conv1 bias (part of its time_projection, None for a bias-free conv), and the
    (owner dict, key, object) links that hold the modules and those biases, for a cheap identity check later."""
    mlp_name, lin1_name, lin2_name = model.TIME_PATH
    te = getattr(model, mlp_name)
    lin1, lin2 = getattr(te, lin1_name), getattr(te, lin2_name)
    links = [(model._modules, mlp_name, te), (te._modules, lin1_name, lin1), (te._modules, lin2_name, lin2)]
    linears, shifts = [lin1, lin2], []
    for blk in model.res_blocks():
        conv1, time_linear = blk.conv1, getattr(blk, blk.TIME_LINEAR)
        links += [(blk._modules, blk.TIME_LINEAR, time_linear), (blk._modules, "conv1", conv1),
                  (conv1._parameters, "bias", conv1.bias)]
        linears.append(time_linear)
        shifts.append(conv1.bias)
    return links, linears, shifts


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


# torch.optim's fused implementations (`fused=True`) update parameters in place without bumping their
# version counters, so every optimizer step anywhere counts as a possible weight change: a lookup after
# one rebuilds the table once (a few ms), and sampling (no optimizer steps) never pays it.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many torch.optim optimizer steps this process has taken (a staleness signal, see above)."""
    return _OPTIMIZER_STEPS[0]


def param_version(p: torch.Tensor) -> int:
    # Inference tensors (made under torch.inference_mode) have no version counter; outside inference
    # mode they cannot be written in place at all, so identity, storage and the step count cover them.
    return -1 if p.is_inference() else p._version


def _fingerprint(params: Sequence[torch.Tensor]) -> Tuple[int, list, list, list, list]:
    # `_version` is bumped by every in-place update made through autograd-visible ops: optimizer
    # steps, `load_state_dict` (param.copy_), EMA `lerp_`/`mul_`. `model.to(dtype/device)` instead
    # swaps the storage under the same Parameter (`param.data = ...`) without a bump: dtype/device
    # catch that, and the data pointer catches round trips (fp32 -> fp16 -> fp32) because the table
    # keeps the old storages alive (`_held`), so a new storage never reuses an old address.
    # Writes through `p.data` (a detached alias with its own counter) are invisible: call refresh().
    # map() keeps the per-lookup cost at a few microseconds for the ~50 parameters of a large UNet.
    return (optimizer_steps(), list(map(param_version, params)), list(map(torch.Tensor.data_ptr, params)),
            list(map(_DTYPE, params)), list(map(_DEVICE, params)))


class TimeTable:
    """Every ResidualBlock's time projection for every step t < n_steps, as one [T, sum(out_c)] tensor.

    Row t is the concatenation over `model.res_blocks()` of each block's time_projection:
    time_emb(Swish(TimeEmbedding(t))) + conv1.bias.
    `lookup(t)` gathers rows on the device (index_select: no host sync, CUDA-graph capturable) and
    splits them into [B, out_c] views, one per block, in res_blocks() order.

    Never silently stale: the identity of every Linear and parameter of the time path, and each
    parameter's version counter, data pointer, dtype and device, are recorded at build time and
    checked on the host by each lookup (no device work; ~50 parameters for the largest preset),
    which rebuilds when anything changed; so does any torch.optim step since the build (fused
    optimizers write without bumping version counters). `refresh()` rebuilds explicitly: needed after writes
    through `p.data` and after replacing whole ResidualBlocks. A rebuild follows the model's
    dtype and device. `copy.deepcopy(model)` gives the copy its own table, bound to the copy
    (rebuilt at its first lookup: its parameters live in new storage).
    While autograd would record the time path (grad mode on and its weights require grad), lookup
    computes the projections instead, so training through an attached table keeps its gradients.
    """

    def __init__(self, model: torch.nn.Module, n_steps: int):
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"TimeTable: n_steps must be a positive int, got {n_steps!r}")
        if not (hasattr(model, "TIME_PATH") and hasattr(model, "res_blocks")):
            raise TypeError("TimeTable: expected a ddpm_fast UNet or DDPMUNet (TIME_PATH, res_blocks()), "
                            f"got {type(model).__name__}")
        self.model = model
        self.n_steps = n_steps
        self.table: Optional[torch.Tensor] = None
        self.sizes: List[int] = []
        self._owner_dicts: list = []
        self._owner_keys: list = []
        self._owned: list = []
        self._params: List[torch.Tensor] = []
        self._held: List[torch.Tensor] = []
        self._state: list = []
        self.refresh()

    # -- building ---------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> "TimeTable":
        """Recompute the table from the model's current weights (dtype and device follow the model)."""
        links, linears, shifts = _time_path(self.model)
        params = [p for lin in linears for p in (lin.weight, lin.bias)]
        if any(p is None for p in params):
            raise RuntimeError("TimeTable: every Linear of the time path must have a bias")
        params += [b for b in shifts if b is not None]
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            if p.dtype != dtype or p.device != device:
                raise RuntimeError(f"TimeTable: time-path parameters mix {dtype} on {device} with "
                                   f"{p.dtype} on {p.device}")
        if not dtype.is_floating_point:
            raise TypeError(f"TimeTable: model weights must be floating point, got {dtype}")
        l1, l2 = linears[0], linears[1]
        t = torch.arange(self.n_steps, device=device)
        sinusoid = self._time_mlp().sinusoid_args()
        if dtype == torch.float64:
            temb = functional.time_embedding(t, l1.weight, l1.bias, l2.weight, l2.bias, **sinusoid)
        else:
            # The fused kernel (the reference on CPU), on fp32 copies: the table is built once, so it
            # is built at least as accurately as the computed path it replaces.
            w = [p.detach().float() for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
            temb = time_embedding(t, *w, **sinusoid)
        # All block projections as ONE matmul against the concatenated weights, in float64: immune
        # to the global TF32 switch, and rounding to the model dtype is then the table's only error.
        act = temb.double()
        act = act * torch.sigmoid(act)
        weight = torch.cat([lin.weight.detach() for lin in linears[2:]]).double()
        # Each block's row also carries its conv1 bias (ResidualBlock.time_projection).
        bias = torch.cat([lin.bias.detach().double() + (0.0 if b is None else b.detach().double())
                          for lin, b in zip(linears[2:], shifts)])
        self.table = torch.addmm(bias, act, weight.t()).to(dtype).contiguous()
        self.sizes = [lin.weight.shape[0] for lin in linears[2:]]
        # (owner dict, key, object) triples: the model -> TimeEmbedding -> lin1/lin2 and block ->
        # time_emb module links, then each Linear's weight and bias entries.
        owners = links + [(lin._parameters, name, getattr(lin, name)) for lin in linears
                          for name in ("weight", "bias")]
        self._owner_dicts = [d for d, _, _ in owners]
        self._owner_keys = [k for _, k, _ in owners]
        self._owned = [o for _, _, o in owners]
        self._params = params
        self._held = [p.detach() for p in params]
        self._state = _fingerprint(params)
        return self

    # -- staleness ----------------------------------------------------------------------------------
    def is_stale(self) -> bool:
        """True when a time-path Linear or parameter was replaced, updated in place, or moved/cast.

        Host-side and cheap (no res_blocks() walk): replacing a whole ResidualBlock is a structural
        edit this check does not look for; call refresh() after one.
        """
        # Identity of every Linear on the path and of every parameter in its Linear (dict lookups,
        # compared with `is`, never tensor ==).
        if any(map(operator.is_not, map(dict.get, self._owner_dicts, self._owner_keys), self._owned)):
            return True
        return _fingerprint(self._params) != self._state

    # -- lookup ---------------------------------------------------------------------------------------
    def lookup(self, t: torch.Tensor) -> List[torch.Tensor]:
        """[B] integer steps in [0, n_steps) -> list of [B, out_c] projections in res_blocks() order.

        The views share one [B, sum(out_c)] gather (row stride sum(out_c)). Steps outside
        [0, n_steps) are an index error (a device-side assert on CUDA), as in any embedding lookup.
        """
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"TimeTable.lookup: t must be a 1-D tensor of steps, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"TimeTable.lookup: t must have an integer dtype, got {t.dtype}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._params):
            return self._computed(t)
        if self.is_stale():
            if self.table.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("TimeTable: the time-path weights changed while a CUDA graph is being "
                                   "captured; call refresh() before capturing")
            self.refresh()
        table = self.table
        if t.dtype not in (torch.int64, torch.int32):
            t = t.long()
        if t.device != table.device:
            t = t.to(table.device, non_blocking=True)
        return list(table.index_select(0, t).split(self.sizes, dim=1))

    def _time_mlp(self) -> torch.nn.Module:
        return getattr(self.model, self.model.TIME_PATH[0])

    def _computed(self, t: torch.Tensor) -> List[torch.Tensor]:
        t_emb = self._time_mlp()(t)
        return [blk.time_projection(t_emb) for blk in self.model.res_blocks()]

    def __repr__(self) -> str:
        shape = tuple(self.table.shape) if self.table is not None else None
        return f"TimeTable(n_steps={self.n_steps}, shape={shape}, blocks={len(self.sizes)})"


def attach_time_table(model: torch.nn.Module, n_steps: int) -> TimeTable:
    """Build a TimeTable for `model`'s current weights and install it as `model.time_table`."""
    table = TimeTable(model, n_steps)
    model.time_table = table
    return table


def detach_time_table(model: torch.nn.Module) -> Optional[TimeTable]:
    """Remove `model.time_table` (the model computes its time path again); returns the old table."""
    old = getattr(model, "time_table", None)
    model.time_table = None
    return old
