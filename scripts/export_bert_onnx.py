#!/usr/bin/env python3
"""Export a randomly initialised BERT-shaped encoder to a single ONNX file.

Usage:
    python3 scripts/export_bert_onnx.py OUT.onnx \
        [--layers 12 --hidden 768 --heads 12 --ffn 3072] [--opset 17]

Defaults give BERT-base (~440 MB of fp32 weights, embedded in OUT.onnx; no
external-data file). Weights are random but deterministic (torch.manual_seed(0)).

Graph interface (same names as the Hugging Face feature-extraction export):
    inputs : input_ids, attention_mask, token_type_ids   int64 [batch_size, sequence_length]
    output : last_hidden_state                           float32 [batch_size, sequence_length, hidden]

The TorchScript exporter (dynamo=False) is tried first; if it raises, the
dynamo exporter is used and its result re-saved as one self-contained file.
Needs: torch, transformers, onnx (and onnxscript for the dynamo path).
"""
import argparse
import os
import sys
import time
from collections import Counter

import onnx
import torch
from transformers import BertConfig, BertModel

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state"]


class Encoder(torch.nn.Module):
    """Returns last_hidden_state as a plain tensor (no ModelOutput)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state


def build(args):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     intermediate_size=args.ffn, max_position_embeddings=512,
                     attn_implementation="eager")
    cfg._attn_implementation = "eager"
    return Encoder(BertModel(cfg, add_pooling_layer=False)).eval()


def export(model, out, opset):
    ids = torch.randint(0, model.bert.config.vocab_size, (2, 16), dtype=torch.int64)
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in INPUTS + OUTPUTS}
    try:
        torch.onnx.export(model, example, out, input_names=INPUTS, output_names=OUTPUTS,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
        return "torchscript (dynamo=False)"
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"TorchScript export failed: {type(e).__name__}: {e}", file=sys.stderr)
    b, s = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    shapes = {n: {0: b, 1: s} for n in INPUTS}
    prog = torch.onnx.export(model, example, input_names=INPUTS, output_names=OUTPUTS,
                             dynamic_shapes=shapes, opset_version=opset, dynamo=True)
    prog.optimize()
    onnx.save(prog.model_proto, out, save_as_external_data=False)
    return "dynamo (dynamo=True)"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args()

    model = build(args)
    t0 = time.time()
    with torch.no_grad():
        try:
            how = export(model, args.out, args.opset)
        except Exception as e:  # noqa: BLE001
            if args.opset == 14:
                raise
            print(f"opset {args.opset} failed ({type(e).__name__}: {e}); retrying with 14",
                  file=sys.stderr)
            args.opset = 14
            how = export(model, args.out, 14)
    dt = time.time() - t0
    extra = [f for f in os.listdir(os.path.dirname(os.path.abspath(args.out)) or ".")
             if f.startswith(os.path.basename(args.out) + ".")]
    print(f"exporter: {how}, opset {args.opset}, {dt:.1f}s")
    print(f"file: {args.out} {os.path.getsize(args.out):,} bytes"
          + (f" (WARNING: side files {extra})" if extra else ""))
    g = onnx.load(args.out).graph
    print("inputs:", [i.name for i in g.input], "outputs:", [o.name for o in g.output])
    for op, n in sorted(Counter(n.op_type for n in g.node).items()):
        print(f"  {op:20s} {n}")


if __name__ == "__main__":
    main()
