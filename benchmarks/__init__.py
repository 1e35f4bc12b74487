"""Reproducible benchmarks: each entry point prints one JSON report (``results/`` keeps the ones quoted).

Run them from the repository root as modules, ``python -m benchmarks.<name>``, so the project's
packages are imported from this checkout and nothing in this directory shadows them:

* ``quality``: Recall/NDCG on a real sequence file, ours beside simple baselines and published figures;
* ``serving``: this service against Hugging Face ``generate`` (one at a time and batched), over HTTP;
* ``overload``: shedding beyond the sustainable rate, recovery, and a soak;
* ``service_latency``, ``join_time``: single-request latency, throughput, continuous vs batch scheduling;
* ``scheduler_profile``: the engine's scheduler alone, in process: latency and where a step's time goes;
* ``decode_step``: aten ops and time per decode step; ``ipa``: what preference alignment buys;
* ``kernel_speed``: the Triton kernels against their PyTorch twins and the usual alternatives;
* ``kernel_parity``: not timed, the Triton kernels' answers against PyTorch's (without a GPU under
  ``TRITON_INTERPRET=1``: tests/test_kernels_parity.py runs it so; needs the ``dev`` extra's hypothesis).

The other modules are their parts: ``kernel_cases`` (kernel inputs, shared with the tests), and the
serving and overload benchmarks' ``workload``, ``hf_baseline``, ``servers``, ``rate_sweep``,
``process_cpu``, ``server_metrics``, ``in_process`` and ``random_store``; ``report`` writes every report.
"""
