"""The claims audit: testbeds, training runs, a run store, a process-pool runner, claims, reports.

Layers (each imports only from those above it):

    config.py    canonical configs, identity hashes, typed claim settings (--set), the audit context
    tasks.py     the task registry (built-in tasks by name, claims' own) and code fingerprints
    data.py      digits, mnist1d, MNIST/Fashion-MNIST IDX, CIFAR-10 (restricted unpickler); splits,
                 content identities of the data (file hashes, generator versions)
    seqdata.py   sequence views of data.py's sets (C6)
    norms.py     the norm registry (none, batch, noisy, frozen-stats, ghost, layer, group)
    models.py    stacked MLP / CNN testbeds (G independent members trained in one pass)
    optim.py     per-member SGD / Adam
    train.py     the "classify" task: one run = a pure function of its config
    metrics.py   the claims' metrics (max stable lr, steps to target, trainable area, gap, ...)
    stats.py     bootstrap intervals and the decision-rule helpers
    store.py     the SQLite run store
    runner.py    local process pool
    protocol.py  Run / Plan and the shared protocol helpers (lr selection, seeds)
    claims/      one module per claim
    report.py    Markdown, HTML and JSON reports with plots
    audit.py     ``bnlab audit`` and ``bnlab report``

The library (reference, kernels, functional, nn, tools) never imports this package.
"""
