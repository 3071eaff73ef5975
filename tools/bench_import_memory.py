"""Peak resident memory of a Hugging Face import against one output rank file plus one tensor.

    python tools/bench_import_memory.py                    # Llama-3.2-1B shapes, bf16 on disk, tp=2 x pp=2
    python tools/bench_import_memory.py --layers 4 --vocab 32000   # a smaller run

Writes a LlamaForCausalLM directory with random bf16 weights of the given shapes (default: Llama
3.2 1B's: hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocabulary 128256, tied embeddings;
1.24B parameters, 2.5 GB on disk), then runs `megalite.checkpoint.hf.import_hf` on it at the
requested layout in a fresh child process, whose peak RSS (VmHWM, Linux) is the figure: it includes
the interpreter, torch and megalite themselves, which the line "at start" shows. The bound the
import is held to (issue 16) is (largest output rank file + largest tensor) x 1.5, the tensor
counted as on disk (bf16; in fp32 the bound would be looser); the ratio peak / (file + tensor) is
printed too.
Needs about 3x the model's fp32 size in free disk (the HF copy and every rank file).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GB = 1e9
CHILD = """
import json, sys
def rss():  # VmHWM, the peak RSS of this process image (ru_maxrss would count the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
from megalite.checkpoint.hf import import_hf
start = rss()
import_hf(sys.argv[1], sys.argv[2], sys.argv[3:])
print(json.dumps({"start": start, "peak": rss()}))
"""


def llama_shapes(a) -> list[tuple[str, list[int]]]:
    """(HF name, shape) of every tensor of a LlamaForCausalLM with these shapes, in HF's order."""
    h, d = a.hidden, a.hidden // a.heads
    shapes = [("model.embed_tokens.weight", [a.vocab, h])]
    for i in range(a.layers):
        o = f"model.layers.{i}."
        shapes += [(o + "input_layernorm.weight", [h]), (o + "self_attn.q_proj.weight", [a.heads * d, h]),
                   (o + "self_attn.k_proj.weight", [a.kv_heads * d, h]),
                   (o + "self_attn.v_proj.weight", [a.kv_heads * d, h]),
                   (o + "self_attn.o_proj.weight", [h, a.heads * d]), (o + "post_attention_layernorm.weight", [h]),
                   (o + "mlp.gate_proj.weight", [a.ffn, h]), (o + "mlp.up_proj.weight", [a.ffn, h]),
                   (o + "mlp.down_proj.weight", [h, a.ffn])]
    return shapes + [("model.norm.weight", [h])]


def write_hf_model(a, hf_dir: Path) -> list[tuple[str, list[int]]]:
    """A random bf16 LlamaForCausalLM directory (config.json + safetensors), written tensor by tensor."""
    from megalite.checkpoint.hf_files import write_safetensors

    hf_dir.mkdir(parents=True)
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
            "intermediate_size": a.ffn, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
            "num_hidden_layers": a.layers, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "vocab_size": a.vocab, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16"}
    (hf_dir / "config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    plan = llama_shapes(a)
    gen = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=gen, dtype=torch.bfloat16) * 0.02) for n, s in plan)
    write_safetensors(tensors, hf_dir, max_shard_bytes=5 * 2**30, dtype=torch.bfloat16, plan=plan)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the HF copy and the checkpoint go (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        hf_dir, out = Path(work) / "hf", Path(work) / "ckpt"
        plan = write_hf_model(a, hf_dir)
        params = sum(torch.Size(s).numel() for _, s in plan)
        child = subprocess.run([sys.executable, "-c", CHILD, str(hf_dir), str(out), f"parallel.tp={a.tp}",
                                f"parallel.pp={a.pp}"], capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"import failed:\n{child.stderr[-4000:]}")
        rss = json.loads(child.stdout.strip().splitlines()[-1])
        largest_file = max(f.stat().st_size for f in (out / "step_00000000").glob("rank_*.safetensors"))
        largest_tensor = 2 * max(torch.Size(s).numel() for _, s in plan)  # bf16, as on disk (the stricter)
    bound = (largest_file + largest_tensor) * 1.5
    print(f"model: {params / 1e9:.2f}B parameters, {2 * params / GB:.2f} GB bf16 on disk; import at tp={a.tp} "
          f"x pp={a.pp}")
    print(f"largest output rank file {largest_file / GB:.2f} GB, largest tensor {largest_tensor / GB:.2f} GB (bf16 on "
          f"disk; {2 * largest_tensor / GB:.2f} GB in fp32)")
    print(f"peak RSS {rss['peak'] / GB:.2f} GB (at start, after importing torch and megalite: "
          f"{rss['start'] / GB:.2f} GB)")
    print(f"bound (file + tensor) x 1.5 = {bound / GB:.2f} GB; peak / (file + tensor) = "
          f"{rss['peak'] / (largest_file + largest_tensor):.2f} -> {'met' if rss['peak'] <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
