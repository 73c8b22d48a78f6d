"""Convert a GPT-2 (random weights, built from a config: nothing is downloaded) from Pre-LN to the equivalent
Pre-RMSNorm and Pre-CRMSNorm models, and compare outputs and forward time.

    python examples/convert_gpt2.py             # GPT-2 small (124M), batch 1 x 128 tokens
    python examples/convert_gpt2.py --quick     # a 2-layer model, a few seconds; no timing printed

Prints, per variant, the max |logits − original logits| (fp32 and fp64) and the time of a forward pass (median and
p20–p80 of the repeats, the models taking turns).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from functools import partial

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import normlayers
from normlayers.bench.timing import TimedCall, WallClockTimer, measure_interleaved
from normlayers.convert import prenorm_to_crmsnorm, prenorm_to_rmsnorm


def build(quick: bool) -> GPT2LMHeadModel:
    if quick:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
    else:
        config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50257 tokens
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms are initialised to γ = 1, β = 0; random ones exercise the folding
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


def variants(model: GPT2LMHeadModel) -> dict[str, torch.nn.Module]:
    rms = prenorm_to_rmsnorm(copy.deepcopy(model), untie_embeddings=True)
    return {
        "pre-ln (nn.LayerNorm)": model,
        "pre-rms (normlayers.RMSNorm)": rms,
        "pre-rms (nn.RMSNorm, via restore_norms)": normlayers.restore_norms(copy.deepcopy(rms)),
        "pre-crms (normlayers.CRMSNorm)": prenorm_to_crmsnorm(copy.deepcopy(model), untie_embeddings=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke test")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forward passes (default 10; quick: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seq_len = args.seq_len or (16 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 10)

    torch.manual_seed(0)
    model = build(args.quick)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    models = variants(model)
    models64 = variants(copy.deepcopy(model).double())  # the exactness check: the same conversion done in fp64
    with torch.inference_mode():
        logits = {name: m(ids).logits for name, m in models.items()}
        logits64 = {name: m(ids).logits for name, m in models64.items()}
    with torch.inference_mode():  # the models take turns, so that a change in machine load hits all of them alike
        stats = measure_interleaved([TimedCall(partial(m, ids)) for m in models.values()], WallClockTimer(),
                                    rounds=repeats, warmup_rounds=2)
        times = dict(zip(models, stats))

    rows = []
    first = next(iter(models))
    print(f"GPT-2 {'(quick) ' if args.quick else ''}{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"batch 1 x {seq_len} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          + ("forward times not printed with --quick" if args.quick else f"forward ms: median (p20-p80) of {repeats}"))
    print(f"{'variant':42s} {'max|dlogits| fp32':>18s} {'fp64':>10s}"
          + ("" if args.quick else f" {'forward ms (p20-p80)':>22s} {'speed-up':>9s}"))
    for name in models:
        diff32 = (logits[name] - logits[first]).abs().max().item()
        diff64 = (logits64[name] - logits64[first]).abs().max().item()
        forward = times[name]
        speedup = times[first].median_ms / forward.median_ms
        rows.append({"variant": name, "max_abs_diff_fp32": diff32, "max_abs_diff_fp64": diff64,
                     "forward_ms": forward.median_ms, "speedup": speedup})
        timing = f" {f'{forward.median_ms:.2f} ({forward.p20_ms:.2f}-{forward.p80_ms:.2f})':>22s} {speedup:8.3f}x"
        print(f"{name:42s} {diff32:18.2e} {diff64:10.1e}" + ("" if args.quick else timing))
    if args.output_json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
                platform.machine(), "quick": args.quick, "seq_len": seq_len, "repeats": repeats,
                "backend": normlayers.get_backend()}
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
