"""Swap the RMSNorms of a Hugging Face Llama for normlayers' with ``replace_norms``: same outputs, same state_dict.

The model is built from a small config with random weights (nothing is downloaded). The script prints the plan
(``plan_replacements``), swaps in place, checks that the logits and the ``state_dict`` keys are unchanged, and times a
forward pass before and after (the two models take turns; median and p20–p80 of the repeats). On a CPU both
models run plain PyTorch (normlayers on its reference backend), so the timing compares two eager implementations; on a
GPU the swapped model runs the Triton kernels.

    python examples/swap_norms_llama.py            # 4 layers, 512 wide, batch 4 x 256 tokens
    python examples/swap_norms_llama.py --quick    # 2 layers, 64 wide (smoke test; no timing printed)
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import normlayers
from normlayers.bench.timing import TimedCall, WallClockTimer, measure_interleaved


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model; its timing is measured but not printed")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.quick:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
        batch, length, repeats = 2, 16, 3
    else:
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512)
        batch, length, repeats = 4, 256, 10
    original = LlamaForCausalLM(config).to(device, dtype).eval()
    with torch.no_grad():  # RMSNorm weights are initialised to ones; random ones make the comparison meaningful
        for name, param in original.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)

    model = copy.deepcopy(original)
    plan = normlayers.plan_replacements(model)
    print(f"{len(plan)} modules to swap, e.g.:")
    for line in plan[:3]:
        print(f"  {line.fqn}: {line.old_type.__name__} -> {line.new_type.__name__}  ({line.reason})")
    keys_before = list(model.state_dict())
    normlayers.replace_norms(model)  # verify=True: each source type is checked on a small input first
    assert list(model.state_dict()) == keys_before, "state_dict keys changed"
    swapped = sum(isinstance(m, normlayers.RMSNorm) for m in model.modules())

    with torch.inference_mode():
        before, after = original(ids).logits, model(ids).logits
    difference = (before.float() - after.float()).abs().max().item()
    with torch.inference_mode():
        time_before, time_after = measure_interleaved(
            [TimedCall(lambda: original(ids)), TimedCall(lambda: model(ids))], WallClockTimer(device), rounds=repeats,
            warmup_rounds=1)
    backend = "Triton kernels" if device == "cuda" else "the reference (no CUDA)"
    print(f"swapped {swapped} RMSNorms; state_dict keys unchanged")
    print(f"max |logits after - logits before| = {difference:.3g} ({args.dtype})")
    if args.quick:  # a tiny model's forward takes about a millisecond: single-digit repeats of it are noise
        print("forward time: not printed with --quick")
    else:
        print(f"forward ms, median (p20-p80) of {repeats}, the models taking turns, {device}, normlayers on {backend}: "
              f"{time_before.median_ms:.1f} ({time_before.p20_ms:.1f}-{time_before.p80_ms:.1f}) before, "
              f"{time_after.median_ms:.1f} ({time_after.p20_ms:.1f}-{time_after.p80_ms:.1f}) after")
    return {"swapped": swapped, "max_abs_difference": difference, "seconds_before": time_before.median_ms / 1e3,
            "seconds_after": time_after.median_ms / 1e3}


if __name__ == "__main__":
    main()
