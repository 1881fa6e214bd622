"""Assisted generation benchmark: plain greedy decoding against assisted greedy decoding with a small RetNet draft
(`assistant_model=`) and with prompt lookup (`prompt_lookup_num_tokens=`), side by side in one run.

transformers (5.25+) verifies a draft's tokens in one forward pass of the target and rolls RetNet's recurrent state
back past the rejected ones (`RetNetCache.crop`); the tokens are plain greedy's. Whether that is faster depends on
how many draft tokens the target accepts, so the benchmark uses trained models: a target and a smaller draft with
the same tokenizer (`retnet-hf train`, the draft's tokenizer given to the target's run with `--tokenizer`), and two
kinds of prompt from a held-out text:

- `prose`: a passage of the text, continued;
- `repetitive`: the same passage followed by its first half again, as when a passage is quoted: the continuation
  repeats what the prompt holds, which prompt lookup copies and a draft predicts.

Per prompt kind, every way (plain, assistant, lookup) runs once untimed (which also counts the target's forward
passes and checks the tokens against plain greedy's), then `--rounds` interleaved rounds time each way's
`generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)` (`interleaved_timings`); tokens/s is N over the
median time, `x plain` the median of the per-round ratios (`paired_median_ratio`).

    python -m benchmarks.assisted --target TARGET_DIR --draft DRAFT_DIR --text HELD_OUT.txt
    python -m benchmarks.assisted --quick          # tiny random models, seconds: a smoke test of the script
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

from retnet_hf.model import RetNetConfig, RetNetForCausalLM
from retnet_hf.model.modeling_retnet import NATIVE_RECURRENT_CACHE, ROLLBACK_NEEDS

from .common import (
    format_table,
    interleaved_timings,
    load_average,
    machine_description,
    measure_bandwidth,
    paired_median_ratio,
    parameter_count,
    publish,
    timed,
)


WAYS = ("plain", "assistant", "lookup")


def prompts_from_text(text: str, tokenizer, passage_chars: int) -> Dict[str, torch.Tensor]:
    """`prose` (a passage) and `repetitive` (the passage, then its first half again), as `[1, T]` token ids."""
    start = len(text) // 2
    start = text.index("\n", start) + 1 if "\n" in text[start:] else start
    passage = text[start : start + passage_chars]
    texts = {"prose": passage, "repetitive": passage + "\n\n" + passage[: passage_chars // 2]}
    return {kind: tokenizer(value, return_tensors="pt").input_ids for kind, value in texts.items()}


def count_forwards(model) -> List[int]:
    """A list that grows by one per forward of `model`'s backbone (the hook stays for the model's life)."""
    calls: List[int] = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def assisted_benchmark(target, draft, prompts, new_tokens: int, rounds: int, assistant_tokens: int, lookup: int):
    """The rows: per prompt kind and way, tokens/s, the ratio to plain greedy, the target's forwards and whether the
    tokens equal plain greedy's."""
    draft.generation_config.num_assistant_tokens = assistant_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    extras = {"plain": {}, "assistant": dict(assistant_model=draft), "lookup": dict(prompt_lookup_num_tokens=lookup)}
    forwards = count_forwards(target)
    rows = []
    for kind, ids in prompts.items():
        settings = dict(min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False)

        def run(way, ids=ids, settings=settings):
            with torch.no_grad():
                return target.generate(ids, attention_mask=torch.ones_like(ids), **settings, **extras[way])

        outputs, target_forwards = {}, {}
        for way in WAYS:  # untimed: the tokens, and the target's forward passes
            forwards.clear()
            outputs[way] = run(way)
            target_forwards[way] = len(forwards)
        times = interleaved_timings({way: (lambda way=way: timed(lambda: run(way))) for way in WAYS}, rounds)
        for way in WAYS:
            rows.append(
                {
                    "prompt": kind,
                    "prompt tokens": ids.shape[1],
                    "way": way,
                    "tokens/s": new_tokens / sorted(times[way])[len(times[way]) // 2],
                    "x plain": paired_median_ratio(times["plain"], times[way]),
                    "target forwards": target_forwards[way],
                    "new tokens per target forward": new_tokens / target_forwards[way],
                    "same tokens as plain": bool(torch.equal(outputs[way], outputs["plain"])),
                    "s by round": times[way],
                }
            )
    return rows


def quick_models():
    """A tiny random target and draft (same vocabulary), and a tokenizer-free pair of prompts."""
    torch.manual_seed(0)
    shape = dict(vocab_size=64, decoder_retention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    target = RetNetForCausalLM(
        RetNetConfig(
            decoder_embed_dim=32, decoder_value_embed_dim=64, decoder_ffn_embed_dim=64, decoder_layers=2, **shape
        )
    ).eval()
    draft = RetNetForCausalLM(
        RetNetConfig(
            decoder_embed_dim=16, decoder_value_embed_dim=32, decoder_ffn_embed_dim=32, decoder_layers=1, **shape
        )
    ).eval()
    passage = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    prompts = {"prose": passage, "repetitive": torch.cat([passage, passage[:, :12]], dim=1)}
    return target, draft, prompts


def load(folder: str):
    from transformers import AutoTokenizer

    model = RetNetForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None  # every run makes exactly --new-tokens tokens
    return model, AutoTokenizer.from_pretrained(folder)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="the target model folder (a trained RetNet)")
    parser.add_argument("--draft", help="the draft model folder (a smaller RetNet with the same tokenizer)")
    parser.add_argument("--text", help="a held-out text file the prompts are taken from")
    parser.add_argument("--passage-chars", type=int, default=600, help="characters of the prose prompt (600)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--assistant-tokens", type=int, default=5, help="draft tokens per round (constant; 5)")
    parser.add_argument("--lookup", type=int, default=5, help="prompt_lookup_num_tokens (5)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true", help="tiny random models (a smoke test; seconds)")
    args = parser.parse_args(argv)
    if not args.quick and not (args.target and args.draft and args.text):
        parser.error("give --target, --draft and --text (or --quick)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not NATIVE_RECURRENT_CACHE:
        print(ROLLBACK_NEEDS, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.quick:
        target, draft, prompts = quick_models()
        args.new_tokens, args.rounds = min(args.new_tokens, 12), min(args.rounds, 2)
    else:
        (target, tokenizer), (draft, _) = load(args.target), load(args.draft)
        prompts = prompts_from_text(Path(args.text).read_text(encoding="utf-8"), tokenizer, args.passage_chars)
    preamble = [
        "# Assisted generation: plain greedy, a RetNet draft, prompt lookup",
        machine_description(measure_bandwidth(64)),
        f"target {parameter_count(target):,} parameters, draft {parameter_count(draft):,}; float32, batch 1, "
        f"{args.new_tokens} new tokens, {args.assistant_tokens} draft tokens per round, prompt lookup "
        f"{args.lookup}, {args.rounds} rounds, torch threads {torch.get_num_threads()}; load average "
        f"{load_average()}",
    ]
    print("\n".join(preamble))
    rows = assisted_benchmark(target, draft, prompts, args.new_tokens, args.rounds, args.assistant_tokens, args.lookup)
    columns = list(rows[0])
    body = [format_table(rows, columns), f"load average after the run: {load_average()}"]
    publish(args.out, "assisted", preamble, body, rows, png="(no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
