"""The benches: shira_fx side by side with PEFT (and what one would write without it), each a
module run from the repository root as `python -m bench.<name>`; `--help` lists its options,
`--smoke` runs it on tiny shapes in seconds (the test suite's mode), `--json PATH` says where
its results go (default bench/results/<name>.json, none with --smoke). Measured figures:
bench/RESULTS.md.

    python -m bench.train        training memory and step time: frozen floor, full fine-tuning,
                                 PEFT LoRA and SHiRA, shira_fx, eager and compiled
    python -m bench.regional     a deep Llama compiled whole vs block by block
    python -m bench.moe          MoE experts (Qwen3-MoE, Mixtral) adapted: shira_fx vs PEFT LoRA
    python -m bench.quantized    4-bit bases: shira_fx vs QLoRA vs PEFT SHiRA; MiniLM-L6 in 4 bits
    python -m bench.distributed  DDP and FSDP2 on 2 ranks (relaunches itself under torchrun)
    python -m bench.kernel_ops   the masked gradient (SDDMM) and scatter kernels vs the alternatives
    python -m bench.switch       adapter switching: AdapterBank vs PEFT, against the bandwidth floor
    python -m bench.mixed        many adapters in one batch (per_request) vs PEFT LoRA's mixed batch
    python -m bench.quality      SHiRA vs LoRA accuracy and concept loss under fusion (MiniLM-L6)
    python -m bench.gpu          one command for a CUDA machine: kernel tests, kernel bench, training
    python -m bench.plot         charts (PNG) of the JSON in bench/results

`bench.common` holds what they share: the command line (`BenchParser`), the timer, the machine
description, the tables and the JSON writer.
"""
