"""CPU speedups, each behind one ``train.*`` flag: the same numbers (or the same distribution), faster.

``dropout`` (+ ``dropout_kernel`` and its C file): seeded dropout masks (``train.fast_cpu_dropout``).
``embedding_grad``: one persistent word-embedding gradient buffer (``train.fast_cpu_embedding_grad``).
"""
