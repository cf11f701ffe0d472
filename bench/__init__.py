"""Throughput harness: the job's default path against plain transformers + PEFT + TRL (see bench/README.md).

    python -m bench.run --out bench/results            # the whole table, one process per configuration

Modules: run (orchestrator), worker (one configuration), data (the benchmark's conversations), flops (model
FLOPs per token and datasheet peaks), peak (device facts and the measured bf16 matmul peak), table (markdown).
"""
