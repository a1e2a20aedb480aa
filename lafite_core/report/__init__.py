"""Reports of runs: an HTML page per evaluation or batch-scoring run, with its figures, in the store.

``evidence`` (what an evaluation keeps of each category), ``figures`` (matplotlib, Agg; PNG bytes),
``page`` (HTML assembly), ``evaluation`` and ``batch`` (the two reports: a pure builder returning
{relative path: bytes}, and a thin reader and writer on the store), ``counts`` (a batch run's counts,
in total and per category), ``target`` (which run a name means).
"""
