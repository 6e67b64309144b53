"""The trainer: config, DeepSpeed ZeRO-3 policy engine, weight sync to vLLM, the AEPO loop.

Importing this package imports neither DeepSpeed nor vLLM; :mod:`aepo.train.engine` and the
loop do, when they run.
"""
