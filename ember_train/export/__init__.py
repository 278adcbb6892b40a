"""Publishing an exported model: its model card and its upload to the Hub.

The saved format itself (sentence-transformers layout) is :mod:`ember_train.models.sentence_transformers`.
"""
