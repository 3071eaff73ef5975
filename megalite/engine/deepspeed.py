"""DeepSpeed ZeRO as the data-parallel engine of megalite's 3D grid (the one module importing deepspeed).

What DeepSpeed owns: the data-parallel reduction of gradients (all-reduce for
ZeRO-0/1, reduce-scatter into this rank's shard for ZeRO-2/3), the sharded
fp32 master weights and AdamW states, clipping, fp16 loss scaling and the
all-gather of updated weights. What megalite keeps: the model (our tensor-
parallel layers), the learning-rate schedule (its rate is written into the
optimizer's param groups before every step, so the curve is the native
engine's to the bit), the data, and checkpoints (no DeepSpeed checkpoint
files and nothing pickled: see `state_dict`).

Groups: `deepspeed.initialize(mpu=groups)` with megalite's ProcessGroups, so
DeepSpeed reads the data-parallel group from our grid and shards over it
only, never across tp or pp ranks. The gradient policy is the native engine's
(megalite.engine.gradients), told to DeepSpeed in its own words: each
parameter's sharding record becomes `tensor_model_parallel` (sharded: counted
in the norm on every tp rank) and `ds_pipe_replicated` (a pipeline copy of a
tied table: left out of the norm), the attributes ZeRO's norm reads.

Sequence parallelism: the gradients of parameters marked `sequence_parallel`
are partial sums over the tp ranks. The policy's tensor hook on each such
parameter sums its gradient over the tp group as soon as autograd produces it,
i.e. before it is accumulated into `.grad` and before any ZeRO hook or
reduction sees it. The sum is linear, so doing it per micro-batch gives the
native result; every tp rank runs the same backward graph, so the collectives line up.

Accumulation: the generated config sets `managed_gradient_accumulation:
false`: `backward` only accumulates; `step` is the boundary. The trainer has
already divided each micro-batch loss by the accumulation steps, so DeepSpeed
is told not to divide again (`scale_wrt_gas=False`). The trainer calls the
model, not DeepSpeed's forward, so a forward pre-hook does the one thing
DeepSpeed's forward adds to its module hooks: `clear_backward_seen_flag`,
which advances ZeRO's micro-step counter (without it ZeRO-2/3 overwrite
instead of accumulating gradients across micro-batches).

Expert parallelism: DeepSpeed's ZeRO-1/2 partition an MoE's experts over the expert-data-parallel
group (ranks holding the same experts) instead of dp, reduce their gradients over it (divided by the
whole dp x cp, as the native engine does) and count each expert once in the grad norm. It finds
experts by `isinstance(module, deepspeed.moe.layer.MoE)` and reads its groups from
deepspeed.utils.groups, keyed by a name ('ep_size_{ep}'); `_experts_known_to_deepspeed` registers
megalite's own ep and edp groups under that name, marks the expert parameters as DeepSpeed's MoE
layers do (`allreduce=False`, `group_name`), and lets that isinstance see megalite's MoE layers for
the duration of deepspeed.initialize (its only MoE check that matters for ZeRO-1/2).

With pipeline parallelism, ZeRO-0/1 work under megalite's scheduler: non-last
stages run autograd.backward on their outputs outside DeepSpeed's backward,
which is harmless there because ZeRO-0/1 reduce gradients only in `step()`.
ZeRO-2/3 reduce-scatter from backward hooks and are refused at config time
(megalite/config/validation.py, _check_engine).
"""
from __future__ import annotations

import contextlib
import math

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from megalite.engine.base import Engine, StepResult
from megalite.engine.ds_config import build_ds_config
from megalite.engine.gradients import GradientPolicy, clip_to_norm
from megalite.optim import LRSchedule, param_groups
from megalite.tensor_parallel import shard_metadata, sharding_of


def _skip_shared_memory_collectives(device_type: str) -> None:
    """On the CPU DeepSpeed would JIT-build its shared-memory collectives op (a minute or more of g++ on the first
    run in each environment) to speed up all-reduce; megalite's process groups already run on gloo, which
    DeepSpeed then uses. Its op table (deepspeed.ops.__compatible_ops__, one dict that keeps edits) is where
    an op is marked unavailable."""
    if device_type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _tell_deepspeed(model: nn.Module) -> None:
    """Each parameter's sharding record, in the attribute names DeepSpeed's norm and clipping read."""
    for p in model.parameters():
        s = sharding_of(p)
        p.tensor_model_parallel = s.partition_dim is not None
        p.ds_pipe_replicated = s.pipeline_copy


@contextlib.contextmanager
def _experts_known_to_deepspeed(model: nn.Module, groups):
    """Within: deepspeed.initialize treats the modules holding expert-parallel parameters as its MoE
    layers, over megalite's ep and edp groups (see the module docstring)."""
    experts = {id(p) for p in model.parameters() if sharding_of(p).expert_parallel}
    if not experts:
        yield
        return
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.utils import groups as ds_groups

    name = f"ep_size_{groups.ep_size}"  # DeepSpeed's own naming of an expert-parallel degree
    for registry, kind in ((ds_groups._EXPERT_PARALLEL_GROUP, "ep"), (ds_groups._EXPERT_DATA_PARALLEL_GROUP, "edp")):
        registry[name] = getattr(groups, f"{kind}_group")
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.members("ep"))
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.members("edp"))
    layers = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in experts:
                p.allreduce, p.group_name = False, name
                layers.add(type(module))
    ds_moe = ds_engine.MoE
    ds_engine.MoE = (ds_moe, *layers)  # isinstance takes a tuple; the layers carry `num_experts`
    try:
        yield
    finally:
        ds_engine.MoE = ds_moe


class DeepSpeedEngine(Engine):
    """The Engine interface over a DeepSpeed engine (ZeRO stage `cfg.engine.zero_stage`).

    `model` is the plain megalite model (a Transformer, or a pipeline stage);
    DeepSpeed wraps it in place, so the trainer keeps calling `model` itself
    (under ZeRO-3 its forward hooks gather the parameter shards). `groups` is
    the ProcessGroups object, handed to DeepSpeed as `mpu`.
    """

    def __init__(self, model: nn.Module, cfg, groups, device_type: str = "cpu"):
        self.model, self.groups, self.stage = model, groups, cfg.engine.zero_stage
        self.precision = cfg.train.precision
        self.ds_config = build_ds_config(cfg, groups.dp_size)
        self.schedule = LRSchedule(cfg.optim, cfg.train.steps)
        _tell_deepspeed(model)
        self.shard_meta = shard_metadata(model, groups.tp_size)  # before ZeRO-3 empties the parameters
        self.aliases = _tied_aliases(model)
        self._hooks = GradientPolicy(list(model.parameters()), groups.tp_group).sequence_parallel_hooks()
        _skip_shared_memory_collectives(device_type)
        with _experts_known_to_deepspeed(model, groups):
            self.ds, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                config=self.ds_config, mpu=groups if dist.is_initialized() else None, dist_init_required=False)
        if self.stage > 0:
            # DeepSpeed's own forward() does this first; the trainer calls the model directly, so a hook does it:
            # ZeRO counts micro-batches here (without it every backward overwrites, not accumulates, the grads)
            model.register_forward_pre_hook(lambda module, inputs: self.optimizer.clear_backward_seen_flag())
        self._stage0_norm = math.nan
        if self.stage == 0:
            self._setup_stage0_norm(cfg.optim.clip_grad)

    def _setup_stage0_norm(self, clip_grad: float) -> None:
        """ZeRO-0 hands the plain torch optimizer the dp-averaged gradients but reports no grad norm.

        A step pre-hook (run after DeepSpeed's all-reduce, before AdamW) computes
        the norm with the gradient policy's tp/pp-aware rule and clips; the
        generated config sets DeepSpeed's own clipping to 0 for stage 0 so
        gradients are clipped exactly once.
        """
        opt = self._plain_optimizer()
        params = [p for group in opt.param_groups for p in group["params"]]
        policy = GradientPolicy(params, self.groups.tp_group, self.groups.mp_group, self.groups.ep_group)

        def pre_step(optimizer, args, kwargs):
            norm = policy.grad_norm()
            self._stage0_norm = float(norm)
            clip_to_norm(params, clip_grad, norm)

        opt.register_step_pre_hook(pre_step)

    # ------------------------------------------------------------------ steps
    def backward(self, loss: torch.Tensor) -> None:
        """Scale (fp16) and backpropagate one micro-batch loss; gradients accumulate until `step`."""
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        """DeepSpeed's reduce, overflow check, clip and AdamW, at megalite's learning rate."""
        scale = self.loss_scale
        lr = self.schedule.rate(self.schedule.last_step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        if getattr(self.optimizer, "overflow", False):
            return StepResult(grad_norm=math.nan, skipped=True, lr=self.schedule.current_lr, loss_scale=scale)
        self.schedule.advance()
        norm = self._stage0_norm if self.stage == 0 else self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return StepResult(grad_norm=norm, skipped=False, lr=lr, loss_scale=scale)

    def zero_grad(self) -> None:
        """Drop accumulated gradients (model and DeepSpeed's partitions)."""
        self.optimizer.zero_grad()
        self.ds.zero_grad()

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1 for fp32/bf16)."""
        return float(getattr(self.optimizer, "loss_scale", 1.0)) if self.precision == "fp16" else 1.0

    # ------------------------------------------------------------ checkpoints
    def shard_metadata(self) -> dict:
        return self.shard_meta  # recorded before ZeRO-3 emptied the parameters

    def state_dict(self) -> dict:
        """This rank's shard of the engine state, as tensors + JSON-able values (nothing to pickle).

        ZeRO stages 1-3: "params" maps each parameter name to this rank's
        slice of it ("start" and "numel" in the flattened parameter, "shape"
        of the whole local (tp-sharded) parameter) with its fp32 master values
        and AdamW moments, so the state is independent of DeepSpeed's flat
        buffer layout (consolidate.py rebuilds full tensors from it without
        DeepSpeed). "shard_metadata" says how tp shards join.
        """
        g = self.groups
        out = {"backend": "deepspeed", "zero_stage": self.stage, "precision": self.precision,
               "coords": {"tp": g.tp_rank, "pp": g.pp_rank, "dp": g.dp_rank, **_cp_ep(g, "rank")},
               "sizes": {"tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size, **_cp_ep(g, "size")},
               "schedule": self.schedule.state_dict(), "scaler": self._scaler_state(),
               "counters": {"global_steps": int(self.ds.global_steps), "global_samples": int(self.ds.global_samples),
                            "skipped_steps": int(self.ds.skipped_steps)},
               "shard_metadata": self.shard_meta, "aliases": self.aliases}
        if self.stage == 0:
            out["optimizer"] = self._plain_optimizer().state_dict()
            return out
        out["params"], out["steps"] = {}, []
        for master, pieces in self._partitions():
            adam = self.optimizer.optimizer.state.get(master, {})
            out["steps"].append(float(adam["step"]) if "step" in adam else 0.0)
            for name, flat, start, numel, shape in pieces:
                entry = {"start": start, "numel": numel, "shape": shape,
                         "master": master.detach()[flat:flat + numel].float().clone()}
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in adam:
                        entry[key] = adam[key].detach()[flat:flat + numel].clone()
                out["params"][name] = entry
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` wrote on this rank (same zero stage and grid)."""
        self._check_layout(state)
        self.schedule.load_state_dict(state["schedule"])
        self._load_scaler(state.get("scaler", {}))
        for key, value in state["counters"].items():
            setattr(self.ds, key, int(value))
        if self.stage == 0:
            self._plain_optimizer().load_state_dict(state["optimizer"])
            return
        for i, (master, pieces) in enumerate(self._partitions()):
            step, adam = state["steps"][i], self.optimizer.optimizer.state
            if step > 0 and master not in adam:  # torch's AdamW creates its state lazily at the first step
                adam[master] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(master),
                                "exp_avg_sq": torch.zeros_like(master)}
            if master in adam:
                adam[master]["step"] = torch.tensor(step)
            for name, flat, _start, numel, _shape in pieces:
                entry = state["params"][name]
                master[flat:flat + numel].copy_(entry["master"])
                for key in ("exp_avg", "exp_avg_sq"):
                    if master in adam and key in entry:
                        adam[master][key][flat:flat + numel].copy_(entry[key])
        self._push_masters_to_model()

    def _check_layout(self, state: dict) -> None:
        g = self.groups
        here = {"zero_stage": self.stage,
                "sizes": {"tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size, **_cp_ep(g, "size")}}
        there = {"zero_stage": state.get("zero_stage"), "sizes": state.get("sizes")}
        if state.get("backend") != "deepspeed" or here != there:
            raise ValueError(f"engine state was written by backend={state.get('backend')!r} with {there}, but this "
                             f"run is backend='deepspeed' with {here}; resume with the same engine, zero stage and "
                             "grid, or start from the consolidated fp32 model (megalite.checkpoint.consolidate)")

    def _plain_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise NotImplementedError(f"checkpointing ZeRO-0 with {type(opt).__name__} (precision="
                                      f"{self.precision}) is not supported; use engine.zero_stage >= 1")
        return opt

    def _partitions(self):
        """[(this rank's fp32 master flat tensor, [(name, offset in it, start in param, numel, shape)])]."""
        return _stage3_partitions(self) if self.stage == 3 else _stage12_partitions(self)

    def _push_masters_to_model(self) -> None:
        opt = self.optimizer
        if self.stage < 3:
            opt.update_lp_params()  # masters -> this rank's bit16 partition, then all-gather over dp
            return
        for i, group in enumerate(opt.fp16_groups):
            offset, master = 0, opt.fp32_partitioned_groups_flat[i]
            for p in group:
                n = p.partition_numel()
                p.ds_tensor.data.copy_(master[offset:offset + n])
                offset += n

    def _scaler_state(self) -> dict:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {k: float(getattr(scaler, k)) for k in SCALER_KEYS if hasattr(scaler, k)}

    def _load_scaler(self, state: dict) -> None:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for key, value in state.items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, type(getattr(scaler, key))(value))


SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """state_dict name -> parameter name, for the extra names tied parameters have in the state dict."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {name: canonical[id(t)] for name, t in model.state_dict(keep_vars=True).items()
            if id(t) in canonical and canonical[id(t)] != name}


def _cp_ep(groups, what: str) -> dict:
    """This rank's cp and ep coordinates (`what`='rank') or sizes ('size'), each only where it is > 1
    (what states before context and expert parallelism recorded)."""
    return {dim: getattr(groups, f"{dim}_{what}") for dim in ("cp", "ep") if getattr(groups, f"{dim}_size") > 1}


def _param_names(engine: DeepSpeedEngine) -> dict[int, str]:
    return {id(p): name for name, p in engine.model.named_parameters()}


def _stage12_partitions(engine: DeepSpeedEngine):
    """ZeRO-1/2: each param group is one flat buffer split evenly over dp (x cp), an MoE group's over the
    expert-data-parallel group (the ranks holding the same experts); rank r of that group owns chunk r."""
    opt, names = engine.optimizer, _param_names(engine)
    out = []
    for i, params in enumerate(opt.bit16_groups):
        flat, master = opt.bit16_groups_flat[i], opt.single_partition_of_fp32_groups[i]
        moe = opt.is_moe_param_group[i] if getattr(opt, "has_moe_layers", False) else False
        r = dist.get_rank(group=opt.real_dp_process_group[i]) if moe else engine.groups.grad_rank
        size, pieces = master.numel(), []
        lo_rank, hi_rank = r * size, (r + 1) * size
        for p in params:
            off = (p.data_ptr() - flat.data_ptr()) // p.element_size()  # params are views into the flat buffer
            lo, hi = max(off, lo_rank), min(off + p.numel(), hi_rank)
            if lo < hi:
                pieces.append((names[id(p)], lo - lo_rank, lo - off, hi - lo, list(p.shape)))
        out.append((master, pieces))
    return out


def _stage3_partitions(engine: DeepSpeedEngine):
    """ZeRO-3: every parameter is split evenly over dp (x cp, padded); a group's master is its shards in order."""
    opt, names, r = engine.optimizer, _param_names(engine), engine.groups.grad_rank
    out = []
    for i, params in enumerate(opt.fp16_groups):
        offset, pieces = 0, []
        for p in params:
            n = p.partition_numel()
            start = r * n
            numel = max(0, min(n, p.ds_numel - start))
            if numel:
                pieces.append((names[id(p)], offset, start, numel, list(p.ds_shape)))
            offset += n
        out.append((opt.fp32_partitioned_groups_flat[i], pieces))
    return out
