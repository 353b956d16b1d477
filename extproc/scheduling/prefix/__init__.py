"""Prefix affinity: the one home of everything the picker knows about which endpoint caches which prompt.

``hashing`` turns a prompt into chained block hashes, ``index`` remembers which endpoint received which
blocks (bounded LRU), ``scorer`` is the ``prefix`` scorer plugin that owns both plus its settings, and
``metrics`` exports its state. The scheduler reaches it only through the framework's hooks.
"""
