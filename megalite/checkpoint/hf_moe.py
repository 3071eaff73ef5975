"""Hugging Face Mixture-of-Experts architectures <-> megalite MoE models (model.moe, model.moe_*).

MixtralForCausalLM and Qwen3MoeForCausalLM are Llama's tensor map (checkpoint.hf_llama; Qwen3-MoE
with Qwen3's per-head q/k RMSNorm and any head_dim) whose MoE layers' feed-forward is a router and
E SwiGLU experts of width f:

  megalite (layer i = 1 .. L)   Mixtral: model.layers.{i-1}.block_sparse_moe.  Qwen3-MoE: model.layers.{i-1}.mlp.
  blocks.i.mlp.router [E, h]      gate.weight                                   gate.weight
  blocks.i.mlp.fc1 [E, 2f, h]     experts.{e}.w1 (gate) / w3 (up).weight [f, h] experts.{e}.gate_proj / up_proj.weight
  blocks.i.mlp.fc2 [E, h, f]      experts.{e}.w2.weight [h, f]                  experts.{e}.down_proj.weight

fc1's rows alternate gate_j, up_j per expert, as the dense MLP's (hf_llama.interleave). The
per-expert names are what transformers (4 and 5) writes with save_pretrained and what published
checkpoints hold. transformers 5 keeps the experts fused in memory (mlp.experts.gate_up_proj
[E, 2f, h], all gate rows then all up rows; mlp.experts.down_proj [E, h, f]; Mixtral's
block_sparse_moe renamed mlp) and converts on saving and loading (its conversion_mapping), so a
file written from that state_dict as is holds the fused names: import reads either form, export
writes the per-expert one, which both transformers versions load.

Routing. Both take a softmax over all E router logits and keep the top k (num_experts_per_tok):
Mixtral renormalises the k kept (model.moe_router='softmax', moe_norm_topk_prob=true), Qwen3-MoE
when its norm_topk_prob says so (moe_norm_topk_prob). Neither has shared experts, a sigmoid router
or a capacity: transformers routes dropless, so a model trained with model.moe_capacity_factor
exports as the dropless model megalite computes without one, and import sets none.
router_aux_loss_coef <-> model.moe_aux_loss_coeff is carried as the coefficient only: transformers'
load-balancing loss pools every layer's tokens and counts each of the k slots, not the per-layer
Switch loss megalite adds, so the same value weighs balancing differently. Import sets no z-loss
(transformers has none); Mixtral's router_jitter_noise (training-time input noise, which megalite
lacks) is not carried.

Which layers are MoE. Mixtral: every one (model.moe_every=1, moe_first_dense=0). Qwen3-MoE: layer
j (0-based) when j is not in mlp_only_layers and (j + 1) % decoder_sparse_step == 0, the others
dense MLPs of intermediate_size (model.ffn_hidden_size; the experts' width moe_intermediate_size
is model.moe_ffn_hidden_size). Import finds the model.moe_every and moe_first_dense that pick
the same layers and refuses, by name, a pattern they cannot express; export writes
decoder_sparse_step = moe_every and mlp_only_layers = the first moe_first_dense layers.

Mixtral's sliding_window is Mistral's (model.attention_window on every layer,
hf_llama_family.mistral_window). Qwen2MoeForCausalLM is refused by name (`refuse_unsupported`):
its shared expert is scaled by a sigmoid gate of its own, which megalite's shared experts lack.

Under tp megalite replicates the experts (every rank holds them all), so import writes each MoE
tensor whole to every tp rank; attention and the dense layers are cut as for Llama.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Mapping

import torch

from megalite.checkpoint import hf_llama
from megalite.checkpoint.hf_llama import deinterleave, interleave, need
from megalite.checkpoint.hf_llama_family import LlamaRelative, mistral_window, refuse_mistral, refuse_qwen3
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig, is_moe_layer, moe_ffn_hidden_size

FUSED_GATE_UP, FUSED_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"  # transformers 5's in memory
# architectures megalite does not import, and why (checked before the supported ones)
REFUSED = {"Qwen2MoeForCausalLM": ("qwen2_moe", "its shared expert's output is scaled by a sigmoid gate of its own "
                                   "(shared_expert_gate), which megalite's shared experts (model.moe_shared_experts, "
                                   "added unscaled) do not have")}


def refuse_unsupported(conf: dict) -> None:
    """Refuse a config.json of an MoE architecture megalite cannot compute, saying why."""
    archs = conf.get("architectures") or []
    for arch, (model_type, why) in REFUSED.items():
        if arch in archs or (not archs and conf.get("model_type") == model_type):
            raise CheckpointError(f"architecture {arch} is not supported: {why}; megalite imports the MoE "
                                  "architectures MixtralForCausalLM and Qwen3MoeForCausalLM")


def required(conf: dict, arch: str, *keys: str):
    """The first of `keys` that config.json sets; refuses a config.json with none of them by name."""
    for key in keys:
        if conf.get(key) is not None:
            return conf[key]
    raise CheckpointError(f"config.json of {arch} sets none of {list(keys)}; give the model's own config.json")


def moe_overrides(conf: dict, arch: str, experts_keys: tuple[str, ...], width_key: str, norm_topk: bool) -> dict:
    """model.moe_* fields of an MoE config.json: experts, top k, expert width, routing and losses."""
    experts = int(required(conf, arch, *experts_keys))
    if experts < 1:
        raise CheckpointError(f"config.json {experts_keys[0]}={experts}: a {arch} without experts is a dense model; "
                              "convert it as its dense architecture")
    return {"moe_num_experts": experts, "moe_top_k": int(required(conf, arch, "num_experts_per_tok")),
            "moe_ffn_hidden_size": int(required(conf, arch, width_key)), "moe_norm_topk_prob": norm_topk,
            "moe_router": "softmax", "moe_shared_experts": 0,
            "moe_aux_loss_coeff": float(conf.get("router_aux_loss_coef", 0.001)), "moe_z_loss_coeff": 0.0,
            "moe_capacity_factor": None}


def _expert_fc1(hf: Mapping, o: str, names: tuple[str, str], experts: int, f: int, h: int) -> torch.Tensor:
    """fc1 [E, 2f, h] from each expert's gate and up [f, h], filled expert by expert (one full tensor
    and one expert's pair in memory)."""
    out = None
    for e in range(experts):
        gate, up = (need(hf, f"{o}experts.{e}.{n}.weight", [f, h]) for n in names)
        if out is None:
            out = torch.empty(experts, 2 * f, h, dtype=gate.dtype, device=gate.device)
        out[e] = interleave(gate, up)
    return out


def _expert_fc2(hf: Mapping, o: str, name: str, experts: int, f: int, h: int) -> torch.Tensor:
    """fc2 [E, h, f] from each expert's down projection [h, f]."""
    out = None
    for e in range(experts):
        down = need(hf, f"{o}experts.{e}.{name}.weight", [h, f])
        if out is None:
            out = torch.empty(experts, h, f, dtype=down.dtype, device=down.device)
        out[e] = down
    return out


def _fused_fc1(hf: Mapping, name: str, experts: int, f: int, h: int) -> torch.Tensor:
    """fc1 [E, 2f, h] from transformers 5's fused gate_up_proj [E, 2f, h] (all gate rows, then all up rows)."""
    gate, up = need(hf, name, [experts, 2 * f, h]).split(f, dim=1)
    return interleave(gate, up)


@dataclass(frozen=True)
class MoERelative(LlamaRelative):
    """A HF MoE architecture on Llama's tensor map: its MoE layers' router and experts under `block`
    (HF's module name of the sparse block in a layer), each expert's (gate, up, down) named `experts`;
    the interface hf.ARCHS expects of each architecture."""

    block: str = "mlp."
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def mismatches(self, cfg: ModelConfig) -> dict[str, tuple]:
        """model.<field> -> (value, what this architecture needs), for every field it cannot represent."""
        out = hf_llama.field_mismatches(cfg, self.wanted)
        if cfg.moe_num_experts < 1:
            out["moe_num_experts"] = (cfg.moe_num_experts, "at least 1")
        return out

    def check(self, cfg: ModelConfig) -> None:
        """Refuse model shapes this architecture cannot represent, naming the setting."""
        if cfg.moe_num_experts < 1:
            raise CheckpointError(f"model.moe_num_experts={cfg.moe_num_experts}: {self.ARCH} is a Mixture-of-Experts "
                                  "model; a dense one exports as LlamaForCausalLM, Qwen3ForCausalLM or the like")
        hf_llama.refuse_mismatches(cfg, self.wanted, self.ARCH, self.style)

    def to_hf(self, state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
        self.check(cfg)
        return hf_llama.tensors_to_hf(state, cfg, self.mlp_to_hf)

    def from_hf(self, hf: Mapping, cfg: ModelConfig) -> Mapping[str, torch.Tensor]:
        """Full megalite state (unpadded vocabulary, the files' dtype) from the HF tensors, each made when asked for."""
        self.check(cfg)
        # names listed once: `name in hf` on a Mapping reads the tensor (HFTensors has no __contains__)
        return hf_llama.tensors_from_hf(hf, cfg, partial(self.mlp_from_hf, names=frozenset(hf)))

    def mlp_to_hf(self, state: Mapping, cfg: ModelConfig, layer: int, p: str, o: str
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """Layer `layer`'s feed-forward HF tensors: the router and per-expert ones, or the dense MLP's."""
        if not is_moe_layer(cfg, layer):
            yield from hf_llama.dense_mlp_to_hf(state, cfg, layer, p, o)
            return
        o, (gate_name, up_name, down_name) = o + self.block, self.experts
        n, h, f = cfg.moe_num_experts, cfg.hidden_size, moe_ffn_hidden_size(cfg)
        yield o + "gate.weight", need(state, p + "mlp.router", [n, h])
        gate, up = deinterleave(need(state, p + "mlp.fc1", [n, 2 * f, h]))
        for e in range(n):
            yield f"{o}experts.{e}.{gate_name}.weight", gate[e]
            yield f"{o}experts.{e}.{up_name}.weight", up[e]
        del gate, up  # let a lazily read tensor go before the next one is read
        down = need(state, p + "mlp.fc2", [n, h, f])
        for e in range(n):
            yield f"{o}experts.{e}.{down_name}.weight", down[e]

    def mlp_from_hf(self, hf: Mapping, cfg: ModelConfig, layer: int, p: str, o: str, names: frozenset) -> dict:
        """Recipes of layer `layer`'s megalite feed-forward tensors, from the per-expert or the fused HF
        names (`names`: the HF tensors' names)."""
        if not is_moe_layer(cfg, layer):
            return hf_llama.dense_mlp_from_hf(hf, cfg, layer, p, o)
        n, h, f = cfg.moe_num_experts, cfg.hidden_size, moe_ffn_hidden_size(cfg)
        fused = f"{o}{self.block}experts.0.{self.experts[0]}.weight" not in names and o + FUSED_GATE_UP in names
        if fused:
            return {p + "mlp.router": partial(need, hf, o + "mlp.gate.weight", [n, h]),
                    p + "mlp.fc1": partial(_fused_fc1, hf, o + FUSED_GATE_UP, n, f, h),
                    p + "mlp.fc2": partial(need, hf, o + FUSED_DOWN, [n, h, f])}
        o = o + self.block
        return {p + "mlp.router": partial(need, hf, o + "gate.weight", [n, h]),
                p + "mlp.fc1": partial(_expert_fc1, hf, o, self.experts[:2], n, f, h),
                p + "mlp.fc2": partial(_expert_fc2, hf, o, self.experts[2], n, f, h)}


# ------------------------------------------------------------------ Mixtral
def mixtral_overrides(conf: dict) -> dict:
    """model fields of a Mixtral config.json beyond Llama's: the window and the experts."""
    return {**mistral_window(conf), **moe_overrides(conf, "MixtralForCausalLM", ("num_local_experts",),
                                                    "intermediate_size", True)}


def mixtral_config(cfg: ModelConfig) -> dict:
    """Mixtral's config.json keys beyond Llama's (intermediate_size is the experts' width)."""
    return {"sliding_window": cfg.attention_window, "intermediate_size": moe_ffn_hidden_size(cfg),
            "num_local_experts": cfg.moe_num_experts, "num_experts_per_tok": cfg.moe_top_k,
            "router_aux_loss_coef": cfg.moe_aux_loss_coeff, "router_jitter_noise": 0.0, "output_router_logits": False}


# ------------------------------------------------------------------ Qwen3-MoE
def qwen3_moe_layers(conf: dict) -> dict:
    """model.moe_every and moe_first_dense picking a Qwen3-MoE config.json's MoE layers; refuses a
    pattern they cannot express, by name."""
    layers = conf["num_hidden_layers"]
    step, only = int(conf.get("decoder_sparse_step") or 1), sorted(conf.get("mlp_only_layers") or [])
    sparse = [n for n in range(1, layers + 1) if n - 1 not in only and n % step == 0]  # 1-based, as megalite's
    for every in [step] + [n for n in range(1, layers + 1) if n != step] if sparse else ():
        first = max(sparse[0] - every, 0)  # dense up to the multiple of `every` before the first MoE layer
        if [n for n in range(1, layers + 1) if n > first and n % every == 0] == sparse:
            return {"moe_every": every, "moe_first_dense": first}
    raise CheckpointError(f"config.json decoder_sparse_step={step} with mlp_only_layers={only} makes layers "
                          f"{[n - 1 for n in sparse]} (0-based) MoE, which model.moe_every (every N-th layer) with "
                          "model.moe_first_dense (the first layers dense) cannot express; convert a model whose "
                          "dense layers are the first ones and MoE layers every N-th after them")


def qwen3_moe_overrides(conf: dict) -> dict:
    """model fields of a Qwen3-MoE config.json beyond Llama's: the experts and which layers have them."""
    arch = "Qwen3MoeForCausalLM"  # transformers 5 writes num_experts as num_local_experts
    return {**moe_overrides(conf, arch, ("num_experts", "num_local_experts"), "moe_intermediate_size",
                            bool(conf.get("norm_topk_prob", False))), **qwen3_moe_layers(conf)}


def qwen3_moe_config(cfg: ModelConfig) -> dict:
    """Qwen3-MoE's config.json keys beyond Llama's (intermediate_size stays the dense layers' width)."""
    return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers, "num_experts": cfg.moe_num_experts,
            "num_experts_per_tok": cfg.moe_top_k, "moe_intermediate_size": moe_ffn_hidden_size(cfg),
            "norm_topk_prob": cfg.moe_norm_topk_prob, "decoder_sparse_step": max(cfg.moe_every, 1),
            "mlp_only_layers": list(range(cfg.moe_first_dense)), "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
            "output_router_logits": False}


_ROUTED = {"moe_router": "softmax", "moe_shared_experts": 0}  # what both need of the experts
MIXTRAL = MoERelative("MixtralForCausalLM", "mixtral",
                      {**_ROUTED, "moe_norm_topk_prob": True, "moe_every": 1, "moe_first_dense": 0},
                      "Llama style with every layer MoE (model.moe_every=1, moe_first_dense=0), a softmax router "
                      "renormalising its top k (model.moe_norm_topk_prob=true), no shared experts, and any "
                      "model.attention_window on every layer", refuse_mistral, mixtral_config,
                      ("attention_window", "moe_num_experts"), mixtral_overrides, "block_sparse_moe.",
                      ("w1", "w3", "w2"))
QWEN3_MOE = MoERelative("Qwen3MoeForCausalLM", "qwen3_moe", {**_ROUTED, "qk_norm": True},
                        "Qwen3 style (model.qk_norm=true) with a softmax router and no shared experts",
                        refuse_qwen3, qwen3_moe_config, ("moe_num_experts",), qwen3_moe_overrides)
