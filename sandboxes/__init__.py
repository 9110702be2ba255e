"""Isolated code execution for code environments (bubblewrap, docker, pool).

Empty until the code-execution environments land; it exists now so the layer contract
(``sandboxes <- envs <- agent <- trainer <- cli``) covers the whole tree from the start.
"""
