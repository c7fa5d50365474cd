"""Remake the llm-compressor fixture of tests/model/test_quantize_reference.py (see README.md).

Step 1, in lowbit's environment, from the repository root: write the tiny random Llama the tests
build (tests/tiny_llama.py) and the calibration windows they draw, to WORK:

    .venv/bin/python -P tests/data/quantize_reference/make_fixture.py WORK

Step 2, in llm-compressor's own environment (no lowbit import), GPTQ with its defaults:

    /tmp/refvenv/bin/python -P benchmarks/gptq_reference_llmcompressor.py WORK --group-size 32 \\
        --symmetric --actorder weight --projections-only --dtype float16 \\
        --out tests/data/quantize_reference/llmcompressor_gptq_w4_g32_sym.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from lowbit.loaders.default_model import default_model_path  # noqa: E402
from lowbit.loaders.gguf_file import read_gguf  # noqa: E402
from lowbit.loaders.tokenizer import tokenizer_from_gguf  # noqa: E402
from lowbit.quantize.calibration import calibration_samples  # noqa: E402
from lowbit.quantize.text_data import standard_text  # noqa: E402
from tests.tiny_llama import save_tiny_llama  # noqa: E402

NUM_SAMPLES, SEQ_LEN, TEXT_CHARS = 16, 64, 200_000


def main() -> None:
    work = Path(sys.argv[1])
    tokenizer = tokenizer_from_gguf(read_gguf(default_model_path()).metadata)
    save_tiny_llama(work / "model", tokenizer.hf)
    windows = calibration_samples(tokenizer, standard_text("c4")[:TEXT_CHARS], NUM_SAMPLES, SEQ_LEN)
    (work / "calibration.json").write_text(json.dumps(windows.tolist()))
    here = Path(__file__).parent
    (here / "calibration.json").write_text(json.dumps(windows.tolist()))
    print(f"wrote the tiny Llama and {NUM_SAMPLES} x {SEQ_LEN} calibration windows to {work}")


if __name__ == "__main__":
    main()
