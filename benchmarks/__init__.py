"""hyperopt_wrap's benchmarks, run from the repository root (they use only the library's public
API):

    python -m benchmarks.study      # tuning quality against random search and lr-free optimizers
    python -m benchmarks.summary    # overhead of one training step against torch.optim
    python -m benchmarks.peers      # side by side with gdtuo, higher and torchopt
    python -m benchmarks.foreach_step                 # the rules' bucketed step, micro-benchmark
    python -m pytest benchmarks --benchmark-only      # the pytest-benchmark suite

Each command's cases are a table in its module (``study.METHODS``, ``summary.VARIANTS``,
``peers.CASES``); what they share is written once: ``models`` (the networks), ``tasks`` (the
study's datasets, splits and losses), ``timing`` (step styles, interleaved rounds, whole
windows), ``memory`` (state bytes, step peaks), ``profiling`` (where a step's time goes) and
``report`` (the machine, the sections of ``benchmarks/RESULTS.md``, markdown tables).
"""
