#!/usr/bin/env python3
"""Writes fixtures/gguf/tiny-llama-gqa.gguf from ../shared/fixtures/hf/tiny-llama-gqa
(Hugging Face config.json + model.safetensors) with the standard gguf-py writer, the way
llama.cpp's convert_hf_to_gguf.py does for Llama: Q and K rows permuted for interleaved
RoPE, tensor names blk.N.attn_q..., tied embeddings (no output.weight). The model has no
tokenizer, so a tiny byte-level BPE one is written: 127 single-character tokens plus
"ab" (one merge), bos 1, eos 2.

It also writes fixtures/gguf/tiny-llama-gqa.logits.json: logits of a fixed token
sequence computed here in numpy from the ORIGINAL Hugging Face weights (HF Llama
semantics: non-interleaved rotate_half RoPE), so ziplm's reader and forward are checked
against an independent implementation.

Needs: pip install gguf numpy safetensors   (gguf 0.17+)
"""
import json
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file
import gguf

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/fixtures/hf/tiny-llama-gqa"
OUT = ROOT / "fixtures/gguf"

cfg = json.loads((SRC / "config.json").read_text())
w = load_file(str(SRC / "model.safetensors"))
H, NH, NKV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
HD = cfg.get("head_dim", H // NH)
L, V, EPS, THETA = cfg["num_hidden_layers"], cfg["vocab_size"], cfg["rms_norm_eps"], cfg["rope_theta"]


def permute(x, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return (x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:])
            .swapaxes(1, 2).reshape(x.shape))


def byte_chars():
    # GPT-2 bytes_to_unicode
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


OUT.mkdir(parents=True, exist_ok=True)
path = OUT / "tiny-llama-gqa.gguf"
wr = gguf.GGUFWriter(str(path), "llama")
wr.add_name("tiny-llama-gqa")
wr.add_block_count(L)
wr.add_context_length(cfg["max_position_embeddings"])
wr.add_embedding_length(H)
wr.add_feed_forward_length(cfg["intermediate_size"])
wr.add_head_count(NH)
wr.add_head_count_kv(NKV)
wr.add_key_length(HD)
wr.add_value_length(HD)
wr.add_rope_dimension_count(HD)
wr.add_rope_freq_base(THETA)
wr.add_layer_norm_rms_eps(EPS)
bc = byte_chars()
tokens = [bc[b] for b in range(127)] + [bc[ord("a")] + bc[ord("b")]]
wr.add_tokenizer_model("gpt2")
wr.add_token_list(tokens)
wr.add_token_types([1] * len(tokens))
wr.add_token_merges([f"{bc[ord('a')]} {bc[ord('b')]}"])
wr.add_bos_token_id(cfg["bos_token_id"])
wr.add_eos_token_id(cfg["eos_token_id"])
wr.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

f32 = lambda a: np.ascontiguousarray(a.astype(np.float32))
wr.add_tensor("token_embd.weight", f32(w["model.embed_tokens.weight"]))
for i in range(L):
    p = f"model.layers.{i}."
    wr.add_tensor(f"blk.{i}.attn_norm.weight", f32(w[p + "input_layernorm.weight"]))
    wr.add_tensor(f"blk.{i}.attn_q.weight", f32(permute(w[p + "self_attn.q_proj.weight"], NH)))
    wr.add_tensor(f"blk.{i}.attn_k.weight", f32(permute(w[p + "self_attn.k_proj.weight"], NKV)))
    wr.add_tensor(f"blk.{i}.attn_v.weight", f32(w[p + "self_attn.v_proj.weight"]))
    wr.add_tensor(f"blk.{i}.attn_output.weight", f32(w[p + "self_attn.o_proj.weight"]))
    wr.add_tensor(f"blk.{i}.ffn_norm.weight", f32(w[p + "post_attention_layernorm.weight"]))
    wr.add_tensor(f"blk.{i}.ffn_gate.weight", f32(w[p + "mlp.gate_proj.weight"]))
    wr.add_tensor(f"blk.{i}.ffn_up.weight", f32(w[p + "mlp.up_proj.weight"]))
    wr.add_tensor(f"blk.{i}.ffn_down.weight", f32(w[p + "mlp.down_proj.weight"]))
wr.add_tensor("output_norm.weight", f32(w["model.norm.weight"]))
wr.write_header_to_file()
wr.write_kv_data_to_file()
wr.write_tensors_to_file()
wr.close()


# Reference forward with the HF weights (float64).
def rms(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * g


def rope(x, pos):  # x [T, n, HD], rotate_half convention
    inv = 1.0 / THETA ** (np.arange(0, HD, 2) / HD)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


d = {k: v.astype(np.float64) for k, v in w.items()}
ids = [(i * 37 + 5) % V for i in range(24)]
T = len(ids)
x = d["model.embed_tokens.weight"][ids]
for i in range(L):
    p = f"model.layers.{i}."
    h = rms(x, d[p + "input_layernorm.weight"])
    q = rope((h @ d[p + "self_attn.q_proj.weight"].T).reshape(T, NH, HD), np.arange(T))
    k = rope((h @ d[p + "self_attn.k_proj.weight"].T).reshape(T, NKV, HD), np.arange(T))
    v = (h @ d[p + "self_attn.v_proj.weight"].T).reshape(T, NKV, HD)
    out = np.zeros((T, NH, HD))
    for hh in range(NH):
        g = hh // (NH // NKV)
        s = q[:, hh] @ k[:, g].T / np.sqrt(HD)
        s = s + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        out[:, hh] = s @ v[:, g]
    x = x + out.reshape(T, NH * HD) @ d[p + "self_attn.o_proj.weight"].T
    h = rms(x, d[p + "post_attention_layernorm.weight"])
    gt = h @ d[p + "mlp.gate_proj.weight"].T
    a = gt / (1 + np.exp(-gt)) * (h @ d[p + "mlp.up_proj.weight"].T)
    x = x + a @ d[p + "mlp.down_proj.weight"].T
logits = rms(x, d["model.norm.weight"]) @ d["model.embed_tokens.weight"].T
(OUT / "tiny-llama-gqa.logits.json").write_text(json.dumps({"ids": ids, "logits": logits.round(6).tolist()}))
print(f"wrote {path} ({path.stat().st_size} bytes) and the reference logits")
