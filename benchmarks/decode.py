"""CPU speed on one GGUF, lowbit beside llama.cpp and HF transformers: `lowbit bench` as a
script (the code is lowbit/bench.py, so an installed lowbit has it too).

    python benchmarks/decode.py                       # default model, all engines
    python benchmarks/decode.py --engines lowbit-bf16kv llama.cpp --tokens 256
"""

from lowbit.bench import main

if __name__ == "__main__":
    main()
