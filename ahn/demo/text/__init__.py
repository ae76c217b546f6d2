"""The text demo: real English (the Paul Graham essays), a small teacher that reads it, and its tasks.

:mod:`.corpus` fetches the essays and splits them; :mod:`.tokenizer` trains the byte-level BPE; :mod:`.tasks`
makes language-modelling windows, RULER-style needles and word-pair recall; :mod:`.teacher` trains and loads
the shipped teacher (``weights/``).
"""
