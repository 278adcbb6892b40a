"""Build the bundled general-ability slices (data/general/) from the shared evaluation sets.

    python scripts/make_general_slices.py --source ../shared/evalsets --out data/general

Small enough to evaluate every ``eval_every`` steps on a CPU, large enough that a few points of
forgetting show: 300 STS Benchmark test pairs, and 100 SciFact test claims over a 600-document
corpus (their cited abstracts plus random others). Seeded, so a rerun writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, required=True, help="the evalsets folder (STSBenchmark/, SciFact/)"
    )
    parser.add_argument("--out", type=Path, default=Path("data/general"))
    parser.add_argument("--sts-pairs", type=int, default=300)
    parser.add_argument("--scifact-queries", type=int, default=100)
    parser.add_argument("--scifact-docs", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    sts = read_jsonl(args.source / "STSBenchmark" / "test.jsonl")
    write_jsonl(args.out / "stsb" / "test.jsonl", rng.sample(sts, args.sts_pairs))

    scifact = args.source / "SciFact"
    qrels: dict[str, list[str]] = {}
    with (scifact / "qrels" / "test.tsv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            query_id, doc_id, _score = line.rstrip("\n").split("\t")
            qrels.setdefault(query_id, []).append(doc_id)
    chosen = sorted(rng.sample(sorted(qrels), args.scifact_queries), key=int)
    relevant = {doc for q in chosen for doc in qrels[q]}
    corpus = read_jsonl(scifact / "corpus.jsonl")
    others = [d for d in corpus if d["_id"] not in relevant]
    kept_ids = relevant | {d["_id"] for d in rng.sample(others, args.scifact_docs - len(relevant))}
    write_jsonl(args.out / "scifact" / "corpus.jsonl", [d for d in corpus if d["_id"] in kept_ids])
    queries = {q["_id"]: q for q in read_jsonl(scifact / "queries.jsonl")}
    write_jsonl(args.out / "scifact" / "queries.jsonl", [queries[q] for q in chosen])
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{doc}\t1" for q in chosen for doc in qrels[q]]
    (args.out / "scifact" / "qrels").mkdir(parents=True, exist_ok=True)
    (args.out / "scifact" / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.sts_pairs} STSB pairs, {len(chosen)} SciFact queries over {len(kept_ids)} documents")


if __name__ == "__main__":
    main()
